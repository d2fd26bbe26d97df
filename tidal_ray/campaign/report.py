"""A campaign's report under ``report/``: ``report.md`` (a table per cycle),
``learning_curve.png`` and ``index.html`` (the campaign at a glance, ``campaign/page.py``).

It is handed the cycles' rows (one dict per trained cycle, built by ``cycle.cycle_rows``)
and reads only what the page shows besides: each selection (k rows), the labels that
came back, the exports' listing and a few thumbnails. Never the pool's data.
"""
from __future__ import annotations

import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import numpy as np

from tidal_ray.campaign.labeling import SAMPLES_DIR, _sample_name
from tidal_ray.campaign.state import cycle_uri, labeled_table
from tidal_ray.data import storage

THUMBNAILS = 48        # per cycle: the top-ranked picks (spread over the clusters, if any)
THUMBNAIL_PX = 96      # longest side of an inlined thumbnail
CYCLE_FILES = ("selection.json", "selection.parquet", "rejects.parquet", "metrics.json")


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


def markdown(heading: str, rows: list[dict]) -> str:
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
    return "\n".join(lines)


# ---- what the page shows of a cycle -----------------------------------------------------------

def _below(base: str, uri: str) -> str:
    """The path of ``uri`` below ``base``, with "/" between parts."""
    if storage.is_s3(uri):
        return uri[len(base.rstrip("/")) + 1:]
    return os.path.relpath(os.path.abspath(uri), os.path.abspath(base)).replace(os.sep, "/")


def relative_href(root: str, uri: str) -> str:
    """A link from ``report/index.html`` to a file of the campaign."""
    return "../" + quote(_below(root, uri))


def cycle_links(root: str, cycle: int) -> list[tuple[str, str]]:
    """``(text, href)`` for a cycle's outputs and exports (the samples as one folder)."""
    links = [(name, relative_href(root, cycle_uri(root, cycle, name)))
             for name in CYCLE_FILES if storage.exists(cycle_uri(root, cycle, name))]
    export = cycle_uri(root, cycle, "export")
    if not storage.exists(export):
        return links
    samples = 0
    for uri, _ in storage.list_files(export):
        if _below(export, uri).startswith(SAMPLES_DIR + "/"):
            samples += 1
        elif not storage.is_hidden(uri):
            links.append((f"export/{_below(export, uri)}", relative_href(root, uri)))
    if samples:
        links.append((f"export/{SAMPLES_DIR}/ ({samples} PNGs)",
                      relative_href(root, storage.join(export, SAMPLES_DIR)) + "/"))
    return links


def thumbnail(data: bytes) -> tuple[str, bool] | None:
    """``(data: URI, small)`` of a picture at most ``THUMBNAIL_PX`` on a side, upright,
    alpha on white; None when it does not decode. ``small``: show it pixelated."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = ImageOps.exif_transpose(img)
            small = max(img.size) < THUMBNAIL_PX // 2
            img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            if img.mode in ("RGBA", "LA", "P", "PA"):
                img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
            img = img.convert("L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            buf = io.BytesIO()
            kind = "png" if small else "jpeg"  # photos: a tenth of the bytes of a PNG
            img.save(buf, format=kind, **({} if small else {"quality": 85}))
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    return f"data:image/{kind};base64,{base64.b64encode(buf.getvalue()).decode()}", small


def _picture_uri(root: str, cycle: int, pool: dict, row: dict) -> str | None:
    """Where a selected sample's picture is: the image file itself, or its exported PNG."""
    if pool.get("format") == "files":
        return storage.join(pool["uri"], str(row["id"]))
    if pool.get("format") in ("pixels", "image"):
        return cycle_uri(root, cycle, "export", SAMPLES_DIR, _sample_name(row["rank"], row["id"]))
    return None  # features: no picture


def _read_or_none(uri: str | None) -> bytes | None:
    try:
        return storage.read_bytes(uri) if uri else None
    except (FileNotFoundError, OSError):
        return None  # not exported yet, or the object is gone


def thumbnails(root: str, cycle: int, pool: dict, picks: list[dict], limit: int = THUMBNAILS) -> list[dict]:
    """Up to ``limit`` of the picks, taken round-robin over the clusters (if any) in
    rank order; returns those that have a picture, with ``src`` and ``small`` added,
    grouped by cluster."""
    picks = sorted(picks, key=lambda p: p["rank"])
    turns, taken = [], {}
    for p in picks:  # the n-th pick of its cluster takes turn n
        turns.append(taken.get(p.get("cluster"), 0))
        taken[p.get("cluster")] = turns[-1] + 1
    chosen = [picks[i] for i in sorted(range(len(picks)), key=lambda i: (turns[i], picks[i]["rank"]))[:limit]]
    with ThreadPoolExecutor(max_workers=8) as workers:  # many small GETs on S3
        data = list(workers.map(_read_or_none, [_picture_uri(root, cycle, pool, p) for p in chosen]))
    shown = []
    for p, blob in zip(chosen, data):
        made = thumbnail(blob) if blob else None
        if made:
            shown.append({**p, "src": made[0], "small": made[1]})
    return sorted(shown, key=lambda p: (p.get("cluster") is None, p.get("cluster") or 0, p["rank"]))


def class_counts(values: list[int], num_classes: int) -> list[int]:
    return np.bincount(np.array([v for v in values if 0 <= v < num_classes], dtype=np.int64),
                       minlength=num_classes).tolist()


def cycle_page(root: str, row: dict, labels: dict, num_classes: int) -> dict:
    """A cycle's row plus what the page shows of its selection: the picks' predicted
    classes and the labels they got, thumbnails and links."""
    page = {**row, "links": cycle_links(root, row["cycle"])}
    selection_uri = cycle_uri(root, row["cycle"], "selection.parquet")
    if "selected" not in row or not storage.exists(selection_uri):
        return page
    columns = ["rank", "id", "score", "predicted_class"]
    table = storage.read_parquet(selection_uri)
    picks = table.select(columns + (["cluster"] if "cluster" in table.column_names else [])).to_pylist()
    got = [labels[p["id"]] for p in picks if labels.get(p["id"]) is not None]
    page["picked_counts"] = class_counts([p["predicted_class"] for p in picks], num_classes)
    page["picked_label_counts"] = class_counts(got, num_classes)
    page["picked_labeled"] = len(got)
    page["clusters"] = "cluster" in table.column_names
    page["thumbnails"] = thumbnails(root, row["cycle"], row.get("pool") or {}, picks)
    return page


def write_report(root: str, rows: list[dict], heading: str, title: str, summary: dict) -> str:
    """Write ``report.md``, ``learning_curve.png`` and ``index.html`` under ``root/report``;
    returns the page's URI. ``summary``: the campaign's name, status and config (page.py)."""
    from tidal_ray.campaign import page

    out = storage.join(root, "report")
    curve = learning_curve_png(rows, title)
    table = labeled_table(root)
    labels = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))
    cycles = [cycle_page(root, r, labels, summary["num_classes"]) for r in rows]
    storage.write_bytes(storage.join(out, "report.md"), markdown(heading, rows).encode())
    storage.write_bytes(storage.join(out, "learning_curve.png"), curve)
    html = page.render({**summary, "labels": table.num_rows}, cycles, curve)
    index = storage.join(out, "index.html")
    storage.write_bytes(index, html.encode())
    return index
