"""``tidal-ray report``: a campaign's learning curve and a one-page summary per cycle."""
from __future__ import annotations

import io

import numpy as np

from . import storage
from .campaign import config_of, cycle_uri, load_state


def cycle_rows(root: str) -> list[dict]:
    state = load_state(root)
    rows = []
    for c in range(state["cycle"] + 1):
        metrics_uri = cycle_uri(root, c, "metrics.json")
        if not storage.exists(metrics_uri):
            break
        m = storage.read_json(metrics_uri)
        row = {"cycle": c, "labeled": m["labeled"], "test_accuracy": m["test_accuracy"], "td_kl": m["td_kl"],
               "train_seconds": m["train_seconds"], "label_counts": m.get("label_counts")}
        selection_json = cycle_uri(root, c, "selection.json")
        if storage.exists(selection_json):
            sel = storage.read_json(selection_json)
            scores = storage.read_parquet(cycle_uri(root, c, "selection.parquet")).column("score").to_numpy()
            row.update(selected=len(scores), score_seconds=sel.get("wall_seconds"),
                       rows_scored=sel.get("rows_scored"), rows_rejected=sel.get("rows_rejected"),
                       score_min=float(scores.min()) if len(scores) else None,
                       score_median=float(np.median(scores)) if len(scores) else None,
                       score_max=float(scores.max()) if len(scores) else None)
        rows.append(row)
    return rows


def _fmt(value, spec=".4f") -> str:
    return "—" if value is None else format(value, spec)


def learning_curve_png(rows: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(r["labeled"], r["test_accuracy"]) for r in rows if r["test_accuracy"] is not None]
    if points:
        ax.plot(*zip(*points), marker="o")
    ax.set_xlabel("labeled samples")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(root: str) -> str:
    state = load_state(root)
    config = config_of(state)
    rows = cycle_rows(root)
    lines = [
        f"# Campaign report: {root}",
        "",
        f"Status **{state['status']}**, cycle {state['cycle']} of {config.cycles}, step `{state['step']}`. "
        f"Strategy `{config.strategy}`, backbone `{config.backbone}`, k = {config.k} per cycle, pool `{config.pool}`.",
        "",
        "| cycle | labeled | test accuracy | TD-module KL | train s | selected | score min / median / max | score s | rejected |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        spread = (f"{_fmt(r.get('score_min'))} / {_fmt(r.get('score_median'))} / {_fmt(r.get('score_max'))}"
                  if "selected" in r else "—")
        lines.append(
            f"| {r['cycle']} | {r['labeled']} | {_fmt(r['test_accuracy'])} | {_fmt(r['td_kl'])} | "
            f"{_fmt(r['train_seconds'], '.1f')} | {r.get('selected', '—')} | {spread} | "
            f"{_fmt(r.get('score_seconds'), '.1f')} | {r.get('rows_rejected', '—')} |"
        )
    if rows and rows[-1].get("label_counts"):
        lines += ["", "Labels per class in the latest training set: "
                  + ", ".join(f"{c}: {n}" for c, n in enumerate(rows[-1]["label_counts"]))]
    lines += ["", "![learning curve](learning_curve.png)", ""]
    text = "\n".join(lines)
    storage.write_bytes(storage.join(root, "report", "report.md"), text.encode())
    storage.write_bytes(storage.join(root, "report", "learning_curve.png"),
                        learning_curve_png(rows, f"campaign {root.rstrip('/').split('/')[-1]}: {config.strategy}"))
    return text
