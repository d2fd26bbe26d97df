"""The initial draw of a campaign: TypiClust on planted blobs, with the oracle and for a person."""
import numpy as np
import pytest
import pyarrow as pa

from tidal_ray.campaign import cycle as campaign
from tidal_ray.campaign.imports import import_labels
from tidal_ray.campaign.initial import typical_ids
from tidal_ray.cli import main
from tidal_ray.data import storage
from tidal_ray.data.pool import describe_pool
from tidal_ray.method.embedding import label_free_embedding, thumbnail

DIM, BLOBS, PAIRS = 8, 5, 10


def blob_pool(uri, values=None):
    """BLOBS well-separated blobs in DIM-d, each its centre plus PAIRS mirrored pairs (so the
    centre is the blob's mean in any affine view); label = blob; ids shuffled over the file.
    Returns the ids of the centres."""
    rng = np.random.default_rng(5)
    centres = rng.normal(0, 50, size=(BLOBS, DIM))
    rows, labels = [], []
    for b, c in enumerate(centres):
        offsets = rng.normal(0, 1, size=(PAIRS, DIM))
        rows += [c, *(c + offsets), *(c - offsets)]
        labels += [b] * (2 * PAIRS + 1)
    ids = rng.permutation(len(rows)) + 1000
    values = np.asarray(rows, np.float32) if values is None else values
    storage.write_parquet(f"{uri}/part-0.parquet", pa.table({
        "id": pa.array(ids, pa.int64()),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), DIM),
        "label": pa.array(labels, pa.int64())}))
    return sorted(ids[np.arange(BLOBS) * (2 * PAIRS + 1)].tolist())


def test_typical_draw_takes_each_blob_centre(tmp_path):
    centres = blob_pool(str(tmp_path / "pool"))
    spec = describe_pool(str(tmp_path / "pool"))
    picked = typical_ids(spec, BLOBS, seed=0, input_shape=(DIM,), backbone="mlp", num_classes=BLOBS)
    assert sorted(picked) == centres


@pytest.mark.parametrize("with_weights", [False, True])
def test_typical_draw_is_the_same_whatever_the_chunks_it_decodes_in(tmp_path, monkeypatch, with_weights):
    # Images decoded and embedded 7 rows at a time, a bad row among them: the same picks as
    # in one chunk (the label-free standardisation and projection are over the whole sample;
    # with --weights, the model's features).
    import torch

    from tidal_ray.campaign import initial
    from tidal_ray.data.make_pool import make_pool
    from tidal_ray.models import build_model

    weights = None
    if with_weights:
        torch.manual_seed(0)
        weights = str(tmp_path / "backbone.pt")
        torch.save(build_model("small_cnn", 10, (1, 8, 8)).backbone.state_dict(), weights)

    pool = str(tmp_path / "pool")
    make_pool(pool, "synthetic", rows=200, fmt="pixels", shards=1, shape=(1, 8, 8))
    storage.write_parquet(f"{pool}/part-00001.parquet", pa.table({
        "id": pa.array([10_000], pa.int64()), "pixels": pa.array([b"short"], pa.binary()),
        "label": pa.array([0], pa.int64())}).replace_schema_metadata(
            storage.read_parquet(f"{pool}/part-00000.parquet").schema.metadata))
    spec = describe_pool(pool)
    common = dict(seed=1, input_shape=(1, 8, 8), backbone="small_cnn", num_classes=10, weights=weights)
    whole = typical_ids(spec, 6, **common)
    monkeypatch.setattr(initial, "EMBED_CHUNK", 7)
    assert typical_ids(spec, 6, **common) == whole
    assert len(set(whole)) == 6 and 10_000 not in whole

    # Progress lines as the sample is read (here after every chunk), counting up to all of it.
    monkeypatch.setattr(initial, "PROGRESS_SECONDS", 0.0)
    lines = []
    assert typical_ids(spec, 6, **common, log=lines.append) == whole
    counts = [int(line.split(" embedded ")[1].split("/")[0]) for line in lines]
    assert len(lines) == -(-201 // 7) and counts == sorted(counts) and counts[-1] == 201
    assert all(line.startswith("initial draw: read and embedded ") and "/201 sample rows" in line for line in lines)


def test_label_free_embedding_is_seeded_and_keeps_the_layout():
    x = np.zeros((3, 1, 28, 28), np.uint8)
    x[1, 0, :14] = 200   # top half bright
    x[2, 0, 14:] = 200   # bottom half bright
    thumbs = thumbnail(x)
    assert thumbs.shape == (3, 64) and thumbs[1, :32].min() == 200 and thumbs[1, 32:].max() == 0
    a, b = label_free_embedding(np.repeat(x, 20, axis=0), seed=1), label_free_embedding(np.repeat(x, 20, axis=0), seed=1)
    assert a.shape == (60, 32) and np.array_equal(a, b)
    assert not np.array_equal(a, label_free_embedding(np.repeat(x, 20, axis=0), seed=2))


def test_campaign_init_typical_with_the_oracle(tmp_path):
    centres = blob_pool(str(tmp_path / "pool"))
    root = str(tmp_path / "campaign")
    assert main(["campaign", "init", root, "--pool", str(tmp_path / "pool"), "--num-classes", str(BLOBS),
                 "--k", "5", "--cycles", "1", "--initial-labels", str(BLOBS), "--initial-draw", "typical",
                 "--oracle", "--trainer", "local", "--epochs", "1"]) == 0
    labels = storage.read_parquet(campaign.labels_uri(root, 0))
    assert sorted(labels.column("id").to_pylist()) == centres
    assert sorted(labels.column("label").to_pylist()) == list(range(BLOBS))   # one per blob, the oracle's labels
    state = campaign.load_state(root)
    assert state["step"] == "train" and state["config"]["initial_draw"] == "typical"
    assert state["config"]["min_steps"] == 300 and state["config"]["warm_start"] is True


def test_initial_draw_without_oracle_is_exported_and_waits_for_labels(ray_local, tmp_path, capsys):
    centres = blob_pool(str(tmp_path / "pool"))
    root = str(tmp_path / "campaign")
    assert main(["campaign", "init", root, "--pool", str(tmp_path / "pool"), "--num-classes", str(BLOBS),
                 "--k", "5", "--cycles", "1", "--initial-labels", str(BLOBS), "--initial-draw", "typical",
                 "--trainer", "local", "--epochs", "1", "--min-steps", "0", "--no-warm-start"]) == 0
    said = capsys.readouterr()
    assert f"the most typical row of each of {BLOBS} clusters of a {BLOBS * (2 * PAIRS + 1)}-row sample" \
        in said.out + said.err
    assert campaign.load_state(root)["config"]["warm_start"] is False
    assert not storage.exists(campaign.labels_uri(root, 0))
    state = campaign.run(root)
    assert state["status"] == "waiting-for-labels" and state["step"] == "initial-wait"
    exported = storage.read_bytes(f"{root}/initial/export/selection.csv").decode().splitlines()
    assert sorted(int(line.split(",")[1]) for line in exported[1:]) == centres
    # a partial delivery, then the rest: the campaign waits until every drawn row has a label
    first = tmp_path / "first.csv"
    first.write_text("id,label\n" + "".join(f"{i},{n}\n" for n, i in enumerate(centres[:2])))
    assert import_labels(root, str(first))["labeled"] == 2
    assert campaign.run(root)["step"] == "initial-wait"
    rest = tmp_path / "rest.csv"
    rest.write_text("id,label\n" + "".join(f"{i},{n + 2}\n" for n, i in enumerate(centres[2:])))
    assert import_labels(root, str(rest))["labeled"] == BLOBS
    assert sorted(campaign.labeled_table(root).column("id").to_pylist()) == centres
    # cycle 0 trains on them, selects, and waits for its own labels
    state = campaign.run(root)
    assert (state["cycle"], state["step"], state["status"]) == (0, "wait-for-labels", "waiting-for-labels")
    assert storage.read_json(campaign.cycle_uri(root, 0, "metrics.json"))["labeled"] == BLOBS
    selected = storage.read_parquet(campaign.cycle_uri(root, 0, "selection.parquet")).column("id").to_pylist()
    assert len(selected) == 5 and not set(selected) & set(centres)


def test_typical_draw_without_an_embedding_is_one_line_exit_2(tmp_path, capsys):
    blob_pool(str(tmp_path / "pool"), values=np.full((BLOBS * (2 * PAIRS + 1), DIM), np.nan, np.float32))
    root = str(tmp_path / "campaign")
    assert main(["campaign", "init", root, "--pool", str(tmp_path / "pool"), "--num-classes", str(BLOBS),
                 "--k", "5", "--cycles", "1", "--initial-labels", "3", "--initial-draw", "typical", "--oracle",
                 "--trainer", "local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--initial-draw typical" in err[0]
    assert not storage.exists(campaign.state_uri(root))


def test_random_draw_on_an_image_prefix_is_exported_and_waits_for_labels(ray_local, s3_bucket):
    # 300 PNG files on loopback S3, listed in runs of 64: the draw lists only the runs it needs.
    import boto3

    from tidal_ray.data.make_pool import make_pool

    pool, root = f"{s3_bucket}/photos", f"{s3_bucket}/campaign"
    make_pool(pool, "synthetic", rows=300, fmt="files", shards=3, shape=(1, 8, 8))
    assert len(describe_pool(pool).ranges) == 5
    assert main(["campaign", "init", root, "--pool", pool, "--num-classes", "10", "--k", "5", "--cycles", "1",
                 "--initial-labels", "12", "--initial-draw", "random", "--seed", "3"]) == 0
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=s3_bucket[5:], Prefix="photos/")
    keys = sorted(o["Key"][len("photos/"):] for page in pages for o in page["Contents"])
    drawn = np.sort(np.random.default_rng(3).choice(len(keys), 12, replace=False))
    drawn_ids = storage.read_parquet(f"{root}/initial/selection.parquet").column("id").to_pylist()
    assert drawn_ids == [keys[i] for i in drawn]
    state = campaign.run(root)
    assert state["status"] == "waiting-for-labels" and state["step"] == "initial-wait"
    exported = storage.read_bytes(f"{root}/initial/export/selection.csv").decode().splitlines()
    assert sorted(line.split(",")[1] for line in exported[1:]) == sorted(drawn_ids)


def test_typical_draw_on_an_image_prefix_picks_what_it_picks_on_the_same_pixels_in_parquet(s3_bucket):
    # The same synthetic rows as PNG files on loopback S3 and as a pixels parquet pool, in the
    # same order: the same positions are drawn and the same rows picked.
    from tidal_ray.data.make_pool import make_pool

    make_pool(f"{s3_bucket}/photos", "synthetic", rows=300, fmt="files", shards=3, shape=(1, 8, 8), seed=4)
    make_pool(f"{s3_bucket}/pixels", "synthetic", rows=300, fmt="pixels", shards=3, shape=(1, 8, 8), seed=4)
    common = dict(seed=2, input_shape=(1, 8, 8), backbone="small_cnn", num_classes=10)
    files = typical_ids(describe_pool(f"{s3_bucket}/photos"), 8, **common)
    pixels = typical_ids(describe_pool(f"{s3_bucket}/pixels"), 8, **common)
    assert [int(key.split("/")[1][:-4]) for key in files] == pixels
    assert all(key.startswith("part-0000") and key.endswith(".png") for key in files)
