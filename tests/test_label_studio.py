"""Label Studio for real: exports a labeler can open (Local Files URLs under a document
root, the settings in README.txt, files readable by others), its JSON, JSON_MIN and CSV
exports read by ``tidal-ray-id`` (never its own task ``id``), skips from the full JSON
export, and (slow) the round trip against a real Label Studio server on loopback."""
import csv
import io
import json
import os
import shutil
import stat
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from label_studio_server import LABEL_STUDIO, running_label_studio
from tidal_ray.campaign.labeling import read_labels, validate_labels, write_exports
from tidal_ray.campaign.state import labeled_table
from tidal_ray.cli import main
from tidal_ray.data import storage
from tidal_ray.data.make_pool import make_pool
from tidal_ray.data.pool import describe_pool
from tidal_ray.errors import BadInput

DATA = Path(__file__).parent / "data" / "label_studio"   # real exports of Label Studio 1.23.2
CLASSES = ["cat", "dog", "bird"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _rows(name, class_names=CLASSES):
    return [(r["id"], r["label"], r.get("skip", False)) for r in read_labels(str(DATA / name), class_names=class_names)]


def test_the_three_real_exports_are_read_by_our_id_never_label_studios():
    # Label Studio's task ids are 1, 2, 3; ours 17, 42, 99 (99 was skipped).
    assert _rows("export.json") == [(17, 1, False), (42, 2, False), (99, None, True)]
    # JSON_MIN and CSV drop the skipped task and carry Label Studio's id beside ours.
    assert _rows("export_min.json") == [(17, 1, False), (42, 2, False)]
    assert _rows("export.csv") == [("17", 1, False), ("42", 2, False)]


def test_a_task_id_equal_to_a_selected_pool_id_is_never_merged_and_a_skip_is_reported():
    rows = read_labels(str(DATA / "export_min.json"), class_names=CLASSES)
    table, problems = validate_labels(rows, [1, 2, 17, 42], 3, lambda key: True)
    assert table.to_pylist() == [{"id": 17, "label": 1}, {"id": 42, "label": 2}]
    rows = read_labels(str(DATA / "export.json"), class_names=CLASSES)
    skips = []
    table, problems = validate_labels(rows, [17, 42, 99], 3, lambda key: True, skips=skips)
    assert table.column("id").to_pylist() == [17, 42] and problems == []
    assert [s["id"] for s in skips] == [99]                       # recorded as a skip, never as a label


@pytest.mark.parametrize("name", ["export.json", "export_min.json", "export.csv"])
def test_an_export_without_our_id_is_refused_in_one_line(tmp_path, name):
    text = (DATA / name).read_text()
    if name == "export.csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, [f for f in rows[0] if f != "tidal-ray-id"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        stripped = buf.getvalue()
    else:
        entries = json.loads(text)
        for entry in entries:
            (entry.get("data") or entry).pop("tidal-ray-id")
        stripped = json.dumps(entries)
    (tmp_path / name).write_text(stripped)
    with pytest.raises(BadInput) as refused:
        read_labels(str(tmp_path / name), class_names=CLASSES)
    assert "tidal-ray-id" in str(refused.value) and "\n" not in str(refused.value)


def test_a_file_of_no_known_shape_is_refused(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps([{"sample": 3, "class": "cat"}]))
    (tmp_path / "x.csv").write_text("sample,class\n3,cat\n")
    for name in ("x.json", "x.csv"):
        with pytest.raises(BadInput, match="neither tidal-ray-id nor id,label"):
            read_labels(str(tmp_path / name))
    # a plain id,label file is still read as it is
    (tmp_path / "plain.json").write_text(json.dumps([{"id": 3, "label": "cat"}]))
    assert [(r["id"], r["label"]) for r in read_labels(str(tmp_path / "plain.json"), class_names=CLASSES)] == [(3, 0)]


def _selection(ids):
    import pyarrow as pa

    return pa.table({"rank": list(range(1, len(ids) + 1)), "id": ids, "score": [0.5] * len(ids),
                     "strategy": ["entropy"] * len(ids), "predicted_class": [1] * len(ids)})


def test_local_exports_are_local_files_urls_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        make_pool(str(tmp_path / "pool"), "digits", rows=30, fmt="pixels")
        spec = describe_pool(str(tmp_path / "pool"))
        out = tmp_path / "labeling" / "camp" / "cycles" / "000" / "export"
        written = write_exports(_selection([4, 9]), spec, str(out), DIGITS, samples_home=str(tmp_path / "labeling" / "camp"))
    finally:
        os.umask(old)
    tasks = json.loads((out / "label-studio-tasks.json").read_text())
    urls = [t["data"]["image"] for t in tasks]
    assert urls == ["/data/local-files/?d=camp/cycles/000/export/samples/00001-4.png",
                    "/data/local-files/?d=camp/cycles/000/export/samples/00002-9.png"]
    readme = (out / "README.txt").read_text()
    assert f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={tmp_path / 'labeling'}\n" in readme
    assert "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true" in readme and str(tmp_path / "labeling" / "camp") in readme
    files = [Path(p) for p in written] + sorted((out / "samples").iterdir())
    assert len(files) == 8 and {oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {"0o644"}

    # another document root: the URLs follow it; one that does not hold the pictures is refused
    write_exports(_selection([4]), spec, str(out), DIGITS, samples_home=str(tmp_path / "labeling" / "camp"),
                  document_root=str(tmp_path))
    task = json.loads((out / "label-studio-tasks.json").read_text())[0]
    assert task["data"]["image"] == "/data/local-files/?d=labeling/camp/cycles/000/export/samples/00001-4.png"
    with pytest.raises(BadInput, match="--document-root"):
        write_exports(_selection([4]), spec, str(out), samples_home=str(tmp_path / "labeling" / "camp"),
                      document_root=str(tmp_path / "labeling" / "camp"))


def test_s3_exports_say_how_label_studio_reaches_them(s3_bucket):
    make_pool(f"{s3_bucket}/pool", "digits", rows=30, fmt="files")
    spec = describe_pool(f"{s3_bucket}/pool")
    out = f"{s3_bucket}/camp/cycles/000/export"
    for presign, says in ((None, "add an Amazon S3 source storage"), (600, "presigned HTTPS URLs, valid until")):
        lines = []
        write_exports(_selection(["00000004.png"]), spec, out, presign_seconds=presign, log=lines.append)
        readme = storage.read_bytes(f"{out}/README.txt").decode()
        assert len(lines) == 1 and says in lines[0] and lines[0].removeprefix("Label Studio: ") in readme
        image = json.loads(storage.read_bytes(f"{out}/label-studio-tasks.json"))[0]["data"]["image"]
        assert image.startswith("http://" if presign else f"{s3_bucket}/pool/00000004.png")
        assert "LABEL_STUDIO_LOCAL_FILES" not in readme


def test_written_files_follow_the_umask(tmp_path):
    for mask, mode in ((0o022, 0o644), (0o027, 0o640), (0o077, 0o600)):
        old = os.umask(mask)
        try:
            storage.write_bytes(str(tmp_path / f"f-{mask:o}"), b"x")
            storage.write_parquet(str(tmp_path / f"p-{mask:o}.parquet"), _selection([1]))
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / f"f-{mask:o}").stat().st_mode) == mode
        assert stat.S_IMODE((tmp_path / f"p-{mask:o}.parquet").stat().st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []   # no temp file left


# ---- the round trip against a real Label Studio ---------------------------------------------

def _cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
@pytest.mark.skipif(not LABEL_STUDIO.exists(), reason=f"{LABEL_STUDIO} not found: `make label-studio` installs it")
def test_round_trip_through_a_real_label_studio(ray_local, tmp_path, capsys):
    work = tmp_path / "work"                       # the default document root: the campaign's parent
    pool = work / "pool"
    make_pool(str(pool), "digits", rows=120, fmt="pixels")
    table = pq.read_table(pool).to_pylist()
    truth = {r["id"]: r["label"] for r in table}
    (work / "seed.csv").write_text("id,label\n" + "".join(f"{r['id']},{DIGITS[r['label']]}\n" for r in table[:20]))
    camp = work / "camp"
    code, out, err = _cli(capsys, "campaign", "init", str(camp), "--pool", str(pool), "--num-classes", "10",
                          "--k", "4", "--cycles", "1", "--initial-labels-file", str(work / "seed.csv"),
                          "--class-names", ",".join(DIGITS), "--trainer", "local", "--epochs", "1",
                          "--min-steps", "0", "--batch-size", "16")
    assert code == 0, err
    code, out, err = _cli(capsys, "campaign", "run", str(camp))
    assert code == 0 and "waiting for labels" in out, out + err
    assert f"Label Studio: LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={work}\n" in out
    assert f"Label Studio: Local Files storage to add to the project (do not sync it): {camp}\n" in out
    copies = {kind: work / f"camp-{kind}" for kind in ("JSON", "JSON_MIN", "CSV")}
    for copy in copies.values():
        shutil.copytree(camp, copy)

    export = camp / "cycles" / "000" / "export"
    tasks = json.loads((export / "label-studio-tasks.json").read_text())
    ours = [t["data"]["tidal-ray-id"] for t in tasks]
    with running_label_studio(work, timeout=600) as ls:   # a first start runs migrations: ~1 min idle, more when loaded
        project = ls.create_project((export / "label-studio-config.xml").read_text())
        ls.add_local_files_storage(project, camp)
        ls.import_tasks(project, tasks)                               # as exported, untouched
        served = ls.tasks(project)
        assert [t["data"]["tidal-ray-id"] for t in served] == ours
        assert all(t["total_predictions"] == 1 for t in served)       # the model's guess is there to accept
        for task in served:                                          # every picture through Label Studio
            status, body = ls.get(task["data"]["image"])
            name = task["data"]["image"].rsplit("/", 1)[-1]
            assert status == 200 and body == (export / "samples" / name).read_bytes(), task["data"]["image"]
        skipped = served[-1]
        for task in served[:-1]:
            ls.annotate(task["id"], DIGITS[truth[task["data"]["tidal-ray-id"]]])
        ls.skip(skipped["id"])
        first = {kind: ls.export(project, kind) for kind in copies}
        ls.annotate(skipped["id"], DIGITS[truth[skipped["data"]["tidal-ray-id"]]])   # the labeler comes back to it
        second = {kind: ls.export(project, kind) for kind in copies}

    skipped_id = skipped["data"]["tidal-ray-id"]
    for kind, copy in copies.items():
        name = "export.csv" if kind == "CSV" else "export.json"
        (work / name).write_bytes(first[kind])
        rows = read_labels(str(work / name), class_names=DIGITS)
        labeled = sorted((int(r["id"]), r["label"]) for r in rows if not r.get("skip"))
        assert labeled == sorted((i, truth[i]) for i in ours if i != skipped_id), kind
        assert [int(r["id"]) for r in rows if r.get("skip")] == ([skipped_id] if kind == "JSON" else [])
        code, out, err = _cli(capsys, "campaign", "import-labels", str(copy), str(work / name))
        if kind == "JSON":   # the only export that carries the skip: the cycle moves on with it
            assert code == 0 and "merged 3 labels and 1 skips" in out and "to continue" in out, out + err
        else:                # JSON_MIN and CSV drop skipped tasks: the labeler's second pass completes it
            assert code == 0 and "merged 3 labels and 0 skips" in out and "1 still to label" in out, out + err
            (work / name).write_bytes(second[kind])
            code, out, err = _cli(capsys, "campaign", "import-labels", str(copy), str(work / name))
            assert code == 0 and "merged 1 labels" in out and "to continue" in out, out + err
        code, out, err = _cli(capsys, "campaign", "run", str(copy))
        assert code == 0 and "campaign done" in out, out + err
        labels = dict(zip(*(labeled_table(str(copy)).column(c).to_pylist() for c in ("id", "label"))))
        expected = {i: truth[i] for i in ours if not (kind == "JSON" and i == skipped_id)}
        assert {i: labels[i] for i in expected} == expected and len(labels) == 20 + len(expected), kind
        metrics = storage.read_json(str(copy / "cycles" / "001" / "metrics.json"))
        assert metrics["labeled"] == 20 + len(expected) and metrics.get("skipped", 0) == (kind == "JSON"), metrics

    # Label Studio's export of tasks that lack our id: one line, exit 2, nothing merged
    entries = json.loads(first["JSON_MIN"])
    for entry in entries:
        entry.pop("tidal-ray-id")
    (work / "theirs.json").write_text(json.dumps(entries))
    code, out, err = _cli(capsys, "campaign", "import-labels", str(camp), str(work / "theirs.json"))
    assert code == 2 and err.count("\n") == 1 and "Label Studio's task id, not a pool id" in err, err
