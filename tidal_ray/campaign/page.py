"""The campaign as one page (``report/index.html``): plain HTML and CSS, charts as inline
SVG, pictures as ``data:`` URIs, links relative to ``report/``. No script, nothing
fetched from elsewhere. Pure rendering: ``report.py`` gathers what it shows.
"""
from __future__ import annotations

import base64
from html import escape

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330;
       max-width: 1120px; margin: 0 auto; padding: 24px 28px 60px; background: #fbfbfc; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 0 0 10px; }
h3 { font-size: 15px; margin: 14px 0 6px; color: #3b4456; }
h4 { font-size: 13px; margin: 8px 0 4px; color: #5d6678; font-weight: 600; }
.summary { font-size: 17px; margin: 6px 0 2px; }
.meta, .note, figcaption, .legend { color: #5d6678; font-size: 13px; }
section { background: #fff; border: 1px solid #e1e4ea; border-radius: 8px; padding: 16px 20px; margin: 18px 0; }
table { border-collapse: collapse; font-size: 14px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e8eaef; text-align: right; }
th { color: #3b4456; font-weight: 600; }
.overview { display: flex; gap: 28px; flex-wrap: wrap; align-items: flex-start; }
.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; margin: 0; }
.facts dt { color: #5d6678; } .facts dd { margin: 0; }
.charts { display: flex; gap: 24px; flex-wrap: wrap; }
.chart svg { display: block; }
.bar0 { fill: #9aa5b8; } .bar1 { fill: #e07b39; } .bar2 { fill: #3a7bd5; }
.key0 { color: #7d879a; } .key1 { color: #e07b39; } .key2 { color: #3a7bd5; }
.axis { fill: #5d6678; font-size: 11px; }
.thumbs { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: 84px; text-align: center; }
figure img { width: 72px; height: 72px; object-fit: contain; background: #f1f2f5; border-radius: 4px; }
img.px { image-rendering: pixelated; }
ul.links { columns: 3; margin: 4px 0; padding-left: 18px; font-size: 14px; }
a { color: #2f62b5; }
"""


def _num(value, spec=".4f") -> str:
    return "—" if value is None else format(value, spec)


def bar_chart(series: list[tuple[str, list[int]]], names: list[str], width: int = 460, height: int = 190) -> str:
    """Grouped bars, one group per class; ``series``: ``(legend, counts)`` each."""
    left, bottom, top_pad = 34, 22, 8
    top = max([max(counts, default=0) for _, counts in series] + [1])
    group = (width - left) / max(len(names), 1)
    bar = group * 0.8 / len(series)
    every = max(1, len(names) // 20)  # at most 20 class labels under the axis
    out = [f'<svg width="{width}" height="{height}" role="img">',
           f'<text class="axis" x="{left - 4}" y="{top_pad + 8}" text-anchor="end">{top}</text>',
           f'<text class="axis" x="{left - 4}" y="{height - bottom}" text-anchor="end">0</text>']
    for i, name in enumerate(names):
        x0 = left + i * group + group * 0.1
        for j, (legend, counts) in enumerate(series):
            h = counts[i] / top * (height - bottom - top_pad)
            out.append(f'<rect class="bar{j}" x="{x0 + j * bar:.1f}" y="{height - bottom - h:.1f}" '
                       f'width="{bar:.1f}" height="{h:.1f}"><title>{escape(legend)}, {escape(name)}: '
                       f'{counts[i]}</title></rect>')
        if i % every == 0:
            out.append(f'<text class="axis" x="{x0 + group * 0.4:.1f}" y="{height - 6}" text-anchor="middle">'
                       f'{escape(name[:8])}</text>')
    out.append("</svg>")
    keys = " ".join(f'<span class="key{j}">■</span> {escape(legend)}' for j, (legend, _) in enumerate(series))
    return "".join(out) + f'<div class="legend">{keys}</div>'


def score_chart(hist: dict, strategy: str, width: int = 460, height: int = 190) -> str:
    """The pool's scores in the reduction's fixed bins, the picked rows over them."""
    left, bottom, top_pad = 40, 22, 8
    counts, selected = hist["counts"], hist["selected"]
    top = max(counts + [1])
    step = (width - left) / len(counts)
    out = [f'<svg width="{width}" height="{height}" role="img">',
           f'<text class="axis" x="{left - 4}" y="{top_pad + 8}" text-anchor="end">{top}</text>',
           f'<text class="axis" x="{left - 4}" y="{height - bottom}" text-anchor="end">0</text>']
    for i, (n, s) in enumerate(zip(counts, selected)):
        lo = hist["low"] + (hist["high"] - hist["low"]) * i / len(counts)
        for cls, value in (("bar0", n), ("bar1", s)):
            h = value / top * (height - bottom - top_pad)
            if value:
                out.append(f'<rect class="{cls}" x="{left + i * step:.1f}" y="{height - bottom - h:.1f}" '
                           f'width="{max(step - 1, 1):.1f}" height="{h:.1f}"><title>score from {lo:.3f}: '
                           f'{n} scored, {s} picked</title></rect>')
    for frac, anchor in ((0, "start"), (0.5, "middle"), (1, "end")):
        value = hist["low"] + (hist["high"] - hist["low"]) * frac
        out.append(f'<text class="axis" x="{left + (width - left) * frac:.1f}" y="{height - 6}" '
                   f'text-anchor="{anchor}">{value:.2f}</text>')
    out.append("</svg>")
    return "".join(out) + (f'<div class="legend"><span class="key0">■</span> scored pool ({sum(counts)} rows) '
                           f'<span class="key1">■</span> picked ({sum(selected)}), {escape(strategy)} score</div>')


def _figure(p: dict) -> str:
    tip = f"rank {p['rank']} · id {p['id']} · score {p['score']:.4f} · predicted class {p['predicted_class']}"
    return (f'<figure><img class="{"px" if p["small"] else "photo"}" src="{escape(p["src"])}" '
            f'alt="id {escape(str(p["id"]))}" title="{escape(tip)}">'
            f'<figcaption>#{p["rank"]} · {escape(str(p["id"])[:12])}</figcaption></figure>')


def pictures(cycle: dict) -> str:
    """The picks' thumbnails, under a heading per cluster when the selection has clusters."""
    pics = cycle.get("thumbnails") or []
    if not pics:
        return ""
    clusters = cycle.get("clusters")
    groups: dict = {}
    for p in pics:
        groups.setdefault(p.get("cluster") if clusters else None, []).append(p)
    blocks = "".join((f"<h4>cluster {escape(str(key))}</h4>" if clusters else "")
                     + '<div class="thumbs">' + "".join(_figure(p) for p in group) + "</div>"
                     for key, group in groups.items())
    shown = f"top {len(pics)} of {cycle['selected']}" if len(pics) < cycle["selected"] else f"all {len(pics)}"
    return f"<h3>Picked samples ({shown}{', by cluster' if clusters else ''})</h3>{blocks}"


def _facts(items: list[tuple[str, str]]) -> str:
    return '<dl class="facts">' + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items) + "</dl>"


def cycle_section(cycle: dict, summary: dict, names: list[str]) -> str:
    c = cycle["cycle"]
    final = "selected" not in cycle
    facts = [("trained on", f"{cycle['labeled']} labels in {_num(cycle['train_seconds'], '.1f')} s"),
             ("test accuracy", _num(cycle["test_accuracy"])), ("TD-module KL", _num(cycle["td_kl"]))]
    if not final:
        timing = cycle.get("timing") or {}
        facts += [("picked", f"{cycle['selected']} of {cycle.get('rows_scored')} scored rows "
                             f"({cycle.get('rows_read')} read, {cycle.get('rows_rejected')} rejected, "
                             f"{cycle.get('rows_excluded')} excluded)"),
                  ("scoring", f"{_num(cycle.get('score_seconds'), '.1f')} s (first row after "
                              f"{_num(timing.get('first_row_seconds'), '.1f')} s, "
                              f"{_num(timing.get('steady_rows_per_s'), ',.0f')} rows/s)"),
                  ("labeled so far", f"{cycle.get('picked_labeled', 0)} of {cycle['selected']} picks"),
                  ("skipped by labelers", str(cycle.get("skipped") or 0))]
    charts = []
    if cycle.get("label_counts"):
        series = [(f"training set ({cycle['labeled']})", cycle["label_counts"])]
        if not final:
            series += [("picked: predicted class", cycle["picked_counts"]),
                       ("picked: label it got", cycle["picked_label_counts"])]
        charts.append(f'<div class="chart"><h3>Classes</h3>{bar_chart(series, names)}</div>')
    if cycle.get("score_histogram"):
        charts.append(f'<div class="chart"><h3>Scores of the pool</h3>'
                      f'{score_chart(cycle["score_histogram"], summary["strategy"])}</div>')
    links = "".join(f'<li><a href="{escape(href)}">{escape(text)}</a></li>' for text, href in cycle["links"])
    title = f"Cycle {c}" + (" — the final model" if final else "")
    return (f'<section id="cycle-{c:03d}"><h2>{escape(title)}</h2>{_facts(facts)}'
            f'<div class="charts">{"".join(charts)}</div>{pictures(cycle)}'
            + (f"<h3>Files</h3><ul class=\"links\">{links}</ul>" if links else "") + "</section>")


def overview_table(cycles: list[dict]) -> str:
    head = ("<tr><th>cycle</th><th>labeled</th><th>test accuracy</th><th>TD KL</th><th>train s</th>"
            "<th>picked</th><th>score s</th><th>skipped</th></tr>")
    rows = "".join(
        f'<tr><td><a href="#cycle-{r["cycle"]:03d}">{r["cycle"]}</a></td><td>{r["labeled"]}</td>'
        f'<td>{_num(r["test_accuracy"])}</td><td>{_num(r["td_kl"])}</td><td>{_num(r["train_seconds"], ".1f")}</td>'
        f'<td>{r.get("selected", "—")}</td><td>{_num(r.get("score_seconds"), ".1f")}</td>'
        f'<td>{r.get("skipped") or 0}</td></tr>' for r in cycles)
    return f"<table>{head}{rows}</table>"


def render(summary: dict, cycles: list[dict], curve_png: bytes) -> str:
    """The whole page. ``summary``: the campaign's config plus name, uri, status, cycle,
    step, updated and labels (how many have arrived)."""
    names = summary.get("class_names") or [str(i) for i in range(summary["num_classes"])]
    scored = [r for r in cycles if r["test_accuracy"] is not None]
    last = (f"last test accuracy {scored[-1]['test_accuracy']:.4f} (cycle {scored[-1]['cycle']})"
            if scored else "no test accuracy (no test set)")
    picked = sum(1 for r in cycles if "selected" in r)
    line = f"{picked} of {summary['cycles']} cycles · {summary['labels']} labels · {last} · {summary['status']}"
    meta = (f"strategy {summary['strategy']} · model {summary['backbone']} · k = {summary['k']} per cycle · "
            f"pool {summary['pool']} · at {summary['uri']} · updated {summary.get('updated') or '—'}")
    curve = base64.b64encode(curve_png).decode()
    body = [f"<h1>Campaign {escape(summary['name'])}</h1>",
            f'<p class="summary">{escape(line)}</p><p class="meta">{escape(meta)}</p>',
            '<section id="overview"><h2>Learning curve</h2><div class="overview">'
            f'<img src="data:image/png;base64,{curve}" width="480" alt="learning curve">'
            f"{overview_table(cycles)}</div>"
            '<p class="note">Also: <a href="report.md">report.md</a> · '
            '<a href="learning_curve.png">learning_curve.png</a></p></section>']
    body += [cycle_section(c, summary, names) for c in reversed(cycles)]  # the latest first
    title = escape(f"Campaign {summary['name']}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
