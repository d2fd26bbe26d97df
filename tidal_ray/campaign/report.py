"""A campaign's report: the learning curve and a one-page table per cycle.

It is handed its rows (one dict per cycle, built by ``campaign.cycle_rows``) and only
renders them; it knows nothing of where a campaign keeps its state.
"""
from __future__ import annotations

import io

from tidal_ray.data import storage


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


def write_report(out_uri: str, heading: str, rows: list[dict], title: str) -> str:
    """Write ``report.md`` and ``learning_curve.png`` under ``out_uri``; returns the markdown."""
    lines = [
        heading,
        "",
        "| cycle | labeled | skipped | test accuracy | TD-module KL | train s | selected | score min / median / max | score s | rejected |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        spread = (f"{_fmt(r.get('score_min'))} / {_fmt(r.get('score_median'))} / {_fmt(r.get('score_max'))}"
                  if "selected" in r else "—")
        lines.append(
            f"| {r['cycle']} | {r['labeled']} | {r.get('skipped', 0)} | {_fmt(r['test_accuracy'])} | {_fmt(r['td_kl'])} | "
            f"{_fmt(r['train_seconds'], '.1f')} | {r.get('selected', '—')} | {spread} | "
            f"{_fmt(r.get('score_seconds'), '.1f')} | {r.get('rows_rejected', '—')} |"
        )
    if rows and rows[-1].get("label_counts"):
        lines += ["", "Labels per class in the latest training set: "
                  + ", ".join(f"{c}: {n}" for c, n in enumerate(rows[-1]["label_counts"]))]
    lines += ["", "![learning curve](learning_curve.png)", ""]
    text = "\n".join(lines)
    storage.write_bytes(storage.join(out_uri, "report.md"), text.encode())
    storage.write_bytes(storage.join(out_uri, "learning_curve.png"), learning_curve_png(rows, title))
    return text
