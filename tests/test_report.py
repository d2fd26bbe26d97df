"""The campaign's page (report/index.html): the score histogram the reduction keeps,
thumbnails, and the page itself, opened where a person sees it (headless Chromium)."""
import base64
import io
import math
import os
import posixpath
from html.parser import HTMLParser
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from chromium_page import chromium_path, page_problems
from tidal_ray.campaign import cycle as campaign
from tidal_ray.campaign import page, report
from tidal_ray.cli import main
from tidal_ray.data import storage
from tidal_ray.demo import write_digits_split
from tidal_ray.score.reduce import HISTOGRAM_BINS, Reduction

NO_CHROMIUM = ("chromium is not installed: `make test-slow` installs Debian's chromium where apt-get exists "
               "(apt-get install chromium)")


def test_reduction_histogram_counts_every_scored_row_in_fixed_bins():
    rng = np.random.default_rng(0)
    top = math.log(4)  # entropy over 4 classes
    reduction = Reduction(7, "entropy", 4, pa.int64(), np.array([3, 10]), lambda f, i: "part-0")
    kept = []
    for start in range(0, 300, 100):
        ids = np.arange(start, start + 100)
        scores = rng.uniform(0, top, 100)
        scores[:3] = [0.0, top, top + 1e-12]  # both ends, and a rounding step past the top
        scores[5] = np.nan                     # rejected, never counted
        reduction.add({"id": ids, "file": np.zeros(100, np.int32), "row": ids, "reason": np.full(100, ""),
                       "predicted_class": ids % 4, "entropy": scores})
        keep = np.isfinite(scores) & ~np.isin(ids, [3, 10])
        kept.append(np.clip(scores[keep], 0, top))
    hist = reduction.score_histogram()
    expected, _ = np.histogram(np.concatenate(kept), bins=HISTOGRAM_BINS, range=(0, top))
    assert hist["bins"] == HISTOGRAM_BINS and (hist["low"], hist["high"]) == (0.0, top)
    assert hist["counts"] == expected.tolist()
    assert sum(hist["counts"]) == reduction.rows_scored == 300 - 3 - 2
    picked = reduction.selection_table().column("score").to_numpy()
    assert hist["selected"] == np.histogram(np.clip(picked, 0, top), bins=HISTOGRAM_BINS, range=(0, top))[0].tolist()
    assert sum(hist["selected"]) == 7 and hist["selected"][-1] >= 2  # the two at the top


def _png(mode, size, color):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _decoded(src):
    assert src.startswith("data:image/")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_thumbnails_take_turns_over_clusters_and_shrink_real_pictures(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "a.png").write_bytes(_png("RGBA", (300, 200), (255, 0, 0, 0)))  # fully transparent
    (pool / "b.png").write_bytes(_png("L", (8, 8), 40))
    (pool / "c.png").write_bytes(_png("RGB", (50, 500), (0, 0, 255)))
    (pool / "d.png").write_bytes(b"not an image")
    picks = [{"rank": r, "id": i, "score": 1.0 - r / 10, "predicted_class": 0, "cluster": c}
             for r, i, c in [(1, "a.png", 0), (2, "d.png", 0), (3, "b.png", 0), (4, "c.png", 1),
                             (5, "gone.png", 1), (6, "b.png", 2)]]
    shown = report.thumbnails(str(tmp_path / "campaign"), 0, {"format": "files", "uri": str(pool)}, picks, limit=5)
    # Turns: ranks 1, 4, 6 (each cluster's first), then 2, 5; d.png and gone.png have no picture.
    assert [(p["cluster"], p["rank"]) for p in shown] == [(0, 1), (1, 4), (2, 6)]
    big, tall, small = (_decoded(p["src"]) for p in shown)
    assert big.size == (96, 64) and big.getpixel((10, 10)) == (255, 255, 255)  # alpha on white
    assert tall.size == (10, 96) and not shown[1]["small"]
    assert small.size == (8, 8) and small.mode == "L" and shown[2]["small"]
    html = page.pictures({"thumbnails": shown, "clusters": True, "selected": len(picks)})
    assert "top 3 of 6, by cluster" in html
    assert html.index("<h4>cluster 0</h4>") < html.index("#1 ·") < html.index("<h4>cluster 1</h4>") < html.index("#4 ·")


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.text, self.ids = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.refs += [(tag, attrs[a]) for a in ("href", "src") if a in attrs]
        if "id" in attrs:
            self.ids.append(attrs["id"])

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def finished_campaign(ray_local, tmp_path_factory):
    """A demo-like campaign: digits, the local trainer, the oracle, 2 cycles."""
    work = tmp_path_factory.mktemp("report")
    pool, test = write_digits_split(str(work / "data"))
    root = str(work / "digits")
    config = campaign.CampaignConfig(pool=pool, test=test, num_classes=10, k=20, cycles=2, initial_labels=30,
                                     oracle=True, trainer="local", backbone="small_cnn", epochs=3,
                                     batch_size=32, seed=0)
    campaign.init(root, config, log=lambda _: None)
    assert campaign.run(root, log=lambda _: None)["status"] == "done"
    return root


@pytest.mark.slow
def test_report_command_writes_a_page_whose_every_image_and_link_resolves(finished_campaign, capsys):
    root = finished_campaign
    metrics_uri = campaign.cycle_uri(root, 1, "metrics.json")
    storage.write_json(metrics_uri, {**storage.read_json(metrics_uri), "skipped": 3})  # as labelers skip
    capsys.readouterr()
    assert main(["report", root]) == 0
    index = os.path.join(root, "report", "index.html")
    assert capsys.readouterr().out.strip().splitlines()[-1] == index
    assert os.path.getsize(os.path.join(root, "report", "learning_curve.png")) > 1000
    assert "| 2 | 70 |" in open(os.path.join(root, "report", "report.md")).read()

    for c in range(2):
        selection = storage.read_json(campaign.cycle_uri(root, c, "selection.json"))
        hist = selection["score_histogram"]
        assert len(hist["counts"]) == HISTOGRAM_BINS and sum(hist["counts"]) == selection["rows_scored"]
        assert sum(hist["selected"]) == 20

    parsed = _Refs()
    parsed.feed(open(index, encoding="utf-8").read())
    text = " ".join(" ".join(parsed.text).split())
    last = storage.read_json(campaign.cycle_uri(root, 2, "metrics.json"))["test_accuracy"]
    assert f"2 of 2 cycles · 70 labels · last test accuracy {last:.4f} (cycle 2)" in text
    assert {"cycle-000", "cycle-001", "cycle-002"} <= set(parsed.ids)
    assert "skipped by labelers 3" in text and "skipped by labelers 0" in text
    images = [ref for tag, ref in parsed.refs if tag == "img"]
    assert len(images) == 1 + 2 * 20  # the learning curve, and every pick of both cycles
    for src in images:
        _decoded(src).load()
    links = [ref for tag, ref in parsed.refs if tag == "a" and not ref.startswith("#")]
    assert any(ref.endswith("export/label-studio-tasks.json") for ref in links)
    assert any(ref.endswith("/samples/") for ref in links)
    for ref in links:
        assert not ref.startswith(("http:", "https:", "//")), ref  # nothing from elsewhere
        assert os.path.exists(os.path.join(os.path.dirname(index), unquote(ref))), ref


@pytest.mark.slow
def test_report_page_loads_in_chromium_without_errors(finished_campaign):
    if chromium_path() is None:
        pytest.skip(NO_CHROMIUM)
    index = campaign.write_report(finished_campaign)
    assert page_problems("file://" + os.path.abspath(index)) == []


def _refs_resolve_on(base_uri, html):
    """Every relative link of a page under ``base_uri`` (a folder of an S3 campaign)."""
    parsed = _Refs()
    parsed.feed(html)
    refs = [ref for tag, ref in parsed.refs if tag == "a" and not ref.startswith("#")]
    bucket, _, folder = base_uri[len("s3://"):].partition("/")
    for ref in refs:
        assert storage.exists(f"s3://{bucket}/" + posixpath.normpath(posixpath.join(folder, unquote(ref)))), ref
    return parsed


@pytest.mark.slow
def test_report_of_a_campaign_on_s3(finished_campaign, s3_bucket):
    root = f"{s3_bucket}/campaigns/digits"
    for dirpath, _, files in os.walk(finished_campaign):
        for name in files:
            path = os.path.join(dirpath, name)
            storage.write_bytes(f"{root}/{os.path.relpath(path, finished_campaign)}", open(path, "rb").read())
    index = campaign.write_report(root)
    assert index == f"{root}/report/index.html"
    parsed = _refs_resolve_on(f"{root}/report", storage.read_bytes(index).decode())
    images = [ref for tag, ref in parsed.refs if tag == "img"]
    assert len(images) == 1 + 2 * 20 and all(src.startswith("data:image/") for src in images)
