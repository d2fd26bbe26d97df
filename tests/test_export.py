"""Labeling-tool formats: exports a person can label (the original objects, rendered PNGs
of parquet rows, presigned URLs, class names, pre-annotations), labels back in (CSV,
Ground Truth, Label Studio's JSON export, class names; bad rows listed, not merged)."""
import io
import json
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tidal_ray.data import storage
from tidal_ray.errors import BadInput
from tidal_ray.campaign.labeling import read_labels, validate_labels, write_exports
from tidal_ray.data.make_pool import make_pool
from tidal_ray.data.pool import describe_pool


def _selection(ids, predicted=(3, 1)):
    return pa.table({"rank": list(range(1, len(ids) + 1)), "id": ids, "score": [0.9, 0.8][:len(ids)],
                     "strategy": ["tidal-entropy"] * len(ids), "predicted_class": list(predicted)[:len(ids)]})


def _exports(out):
    manifest = [json.loads(line) for line in (out / "ground-truth-input.manifest").read_text().splitlines()]
    return manifest, json.loads((out / "label-studio-tasks.json").read_text())


def test_image_prefix_exports_point_at_the_objects_and_carry_the_prediction(tmp_path):
    make_pool(str(tmp_path / "pool"), "digits", rows=20, fmt="files")
    selection = _selection(["00000007.png", "00000003.png"])
    names = [f"digit-{i}" for i in range(10)]
    write_exports(selection, describe_pool(str(tmp_path / "pool")), str(tmp_path / "out"), class_names=names)
    manifest, tasks = _exports(tmp_path / "out")
    assert [m["source-ref"] for m in manifest] == [str(tmp_path / "pool" / "00000007.png"),
                                                    str(tmp_path / "pool" / "00000003.png")]
    assert [m["tidal-ray-id"] for m in manifest] == ["00000007.png", "00000003.png"]
    # Label Studio reaches local pictures through its Local Files serving (document root: the pool's parent)
    assert [t["data"]["image"] for t in tasks] == ["/data/local-files/?d=pool/00000007.png",
                                                   "/data/local-files/?d=pool/00000003.png"]
    assert [t["data"]["tidal-ray-id"] for t in tasks] == ["00000007.png", "00000003.png"]
    assert tasks[0]["predictions"][0]["result"] == [{"from_name": "label", "to_name": "image", "type": "choices",
                                                     "value": {"choices": ["digit-3"]}}]
    categories = json.loads((tmp_path / "out" / "ground-truth-label-categories.json").read_text())
    assert [c["label"] for c in categories["labels"]] == names
    config = (tmp_path / "out" / "label-studio-config.xml").read_text()
    assert '<Image name="image" value="$image"/>' in config and '<Choice value="digit-9"/>' in config
    assert not (tmp_path / "out" / "samples").exists()


def test_parquet_pixels_exports_render_a_png_per_selected_sample(s3_bucket):
    pool, out = f"{s3_bucket}/pool", f"{s3_bucket}/export"
    make_pool(pool, "synthetic", rows=300, fmt="pixels", shards=3, shape="3x12x10")
    spec = describe_pool(pool)
    write_exports(_selection([250, 4]), spec, out, presign_seconds=600)
    manifest = [json.loads(line) for line in storage.read_bytes(f"{out}/ground-truth-input.manifest").splitlines()]
    tasks = json.loads(storage.read_bytes(f"{out}/label-studio-tasks.json"))
    rows = {r["id"]: r["pixels"] for r in pq.read_table(spec.fs_paths()[2], filesystem=storage.s3_filesystem())
            .to_pylist() + pq.read_table(spec.fs_paths()[0], filesystem=storage.s3_filesystem()).to_pylist()}
    for entry, sample_id in zip(manifest, [250, 4]):
        assert entry["source-ref"].startswith(f"{out}/samples/") and entry["tidal-ray-id"] == sample_id
        with Image.open(io.BytesIO(storage.read_bytes(entry["source-ref"]))) as img:
            shown = np.asarray(img).transpose(2, 0, 1)
        np.testing.assert_array_equal(shown, np.frombuffer(rows[sample_id], np.uint8).reshape(3, 12, 10))
    assert len(storage.list_files(f"{out}/samples")) == 2
    # --presign: Label Studio gets HTTPS URLs that fetch the same PNG from the S3 server
    for task, entry in zip(tasks, manifest):
        url = task["data"]["image"]
        assert url.startswith("http") and "Signature" in url
        with urllib.request.urlopen(url) as response:
            assert response.read() == storage.read_bytes(entry["source-ref"])


def test_feature_pool_exports_carry_the_id_and_the_uri_column(tmp_path):
    table = pa.table({"id": pa.array([1, 2, 3], pa.int64()),
                      "features": pa.array([[0.0, 1.0]] * 3, pa.list_(pa.float32(), 2)),
                      "uri": ["s3://photos/a.jpg", "s3://photos/b.jpg", "s3://photos/c.jpg"]})
    storage.write_parquet(str(tmp_path / "pool" / "a.parquet"), table)
    write_exports(_selection([3, 1]), describe_pool(str(tmp_path / "pool")), str(tmp_path / "out"))
    manifest, tasks = _exports(tmp_path / "out")
    assert [m["source-ref"] for m in manifest] == ["s3://photos/c.jpg", "s3://photos/a.jpg"]
    assert [t["data"] for t in tasks][0] == {"text": "3", "uri": "s3://photos/c.jpg", "tidal-ray-id": 3}
    assert tasks[0]["predictions"][0]["result"][0]["to_name"] == "text"
    assert (tmp_path / "out" / "selection.csv").read_text().splitlines() == [
        "rank,id,score,strategy,predicted_class", "1,3,0.9,tidal-entropy,3", "2,1,0.8,tidal-entropy,1"]


def test_label_studio_export_is_read_with_class_names(tmp_path):
    export = tmp_path / "ls.json"
    export.write_text(json.dumps([
        {"id": 1, "data": {"image": "x", "tidal-ray-id": 17},
         "annotations": [{"result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                      "value": {"choices": ["dog"]}}]}]},
        {"id": 2, "data": {"tidal-ray-id": 4}, "annotations": [
            {"result": [{"value": {"choices": ["cat"]}}]},
            {"was_cancelled": True, "result": [{"value": {"choices": ["dog"]}}]}]},
        {"id": 3, "data": {"tidal-ray-id": 5}, "annotations": []},
    ]))
    rows = read_labels(str(export), class_names=["cat", "dog"])
    assert [(r["id"], r["label"]) for r in rows] == [(17, 1), (4, 0), (5, None)]
    assert rows[2]["error"] == "no choice in its annotations"
    with pytest.raises(BadInput, match=r"unknown class name\(s\) 'dog'.*the classes are cat, bird"):
        read_labels(str(export), class_names=["cat", "bird"])


def test_ground_truth_output_manifest_is_read(tmp_path):
    out = tmp_path / "output.manifest"
    out.write_text("\n".join(json.dumps(e) for e in [
        {"source-ref": "s3://bkt/pool/cats/a.png", "my-job": 3,
         "my-job-metadata": {"class-name": "cat", "type": "groundtruth/image-classification"}},
        {"source": "17", "tidal-ray-id": 17, "my-job": 1, "my-job-metadata": {"class-name": "dog"}},
    ]) + "\nnot json\n")
    rows = read_labels(str(out), pool_uri="s3://bkt/pool")
    assert [(r["id"], r["label"]) for r in rows[:2]] == [("cats/a.png", 3), (17, 1)]
    assert rows[2]["error"] == "not valid JSON"


def test_bad_rows_are_listed_and_good_rows_kept(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\n5,2\n999,1\n7,12\n8,cat\n5,3\n6,1\n")
    rows = read_labels(str(labels))
    table, problems = validate_labels(rows, [5, 7, 8], num_classes=10, pool_has_id=lambda key: key == "6")
    assert table.to_pylist() == [{"id": 5, "label": 2}]
    reasons = {(p["line"], p["reason"]) for p in problems}
    assert reasons == {(3, "unknown id"), (4, "label 12 out of range 0..9"), (5, "label 'cat' is not an integer"),
                       (6, "duplicate id in this import"), (7, "not selected in this cycle")}
