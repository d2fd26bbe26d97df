"""Labeling-tool formats: manifests out, labels back in (with bad rows listed, not merged)."""
import json

import pyarrow as pa

from tidal_ray.labeling import (ground_truth_manifest, label_studio_tasks, read_labels, selection_csv,
                              validate_labels)

SELECTION = pa.table({"rank": [1, 2], "id": ["cats/a.png", "dogs/b.png"], "score": [0.9, 0.8],
                      "strategy": ["tidal-entropy"] * 2, "predicted_class": [3, 1]})


def test_ground_truth_manifest_points_at_the_objects_of_an_image_prefix():
    lines = [json.loads(line) for line in ground_truth_manifest(SELECTION, "s3://bkt/pool/", True).splitlines()]
    assert [line["source-ref"] for line in lines] == ["s3://bkt/pool/cats/a.png", "s3://bkt/pool/dogs/b.png"]
    assert [line["tidal-ray-id"] for line in lines] == ["cats/a.png", "dogs/b.png"]


def test_manifests_for_a_parquet_pool_carry_id_and_data_reference():
    selection = SELECTION.set_column(1, "id", pa.array([17, 4]))
    lines = [json.loads(line) for line in ground_truth_manifest(selection, "s3://bkt/pool", False).splitlines()]
    assert lines[0] == {"source": "17", "data-ref": "s3://bkt/pool", "tidal-ray-id": 17,
                        "tidal-ray-rank": 1, "tidal-ray-score": 0.9}
    tasks = json.loads(label_studio_tasks(selection, "s3://bkt/pool", False))
    assert [t["data"]["tidal-ray-id"] for t in tasks] == [17, 4]
    assert selection_csv(selection).splitlines() == [
        "rank,id,score,strategy,predicted_class", "1,17,0.9,tidal-entropy,3", "2,4,0.8,tidal-entropy,1"]


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
