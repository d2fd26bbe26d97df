"""Pool formats: detection and schema checks, decoding and its rejects, make_pool, load_rows.
All in-process (no Ray); real parquet/PNG files on disk and on the loopback S3 server."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tidal_ray.data.datasets import load_digits
from tidal_ray.data.make_pool import make_pool
from tidal_ray.data.decode import (NOT_FINITE, NULL_ID, UNDECODABLE, WRONG_LENGTH, decode_batch, is_decoded,
                              stream_batch, tensor_rows)
from tidal_ray.data.loader import load_rows
from tidal_ray.data.lookup import pool_has_ids
from tidal_ray.data.listing import is_image_prefix
from tidal_ray.data.pool import SHAPE_KEY, check_compatible, describe_pool

FORMATS = ["pixels", "image", "features", "files"]


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
def test_digits_pool_round_trips_through_load_rows(tmp_path, fmt):
    ids, pixels, labels = load_digits()
    files = make_pool(str(tmp_path / "pool"), "digits", rows=300, fmt=fmt, shards=3)
    assert len(files) == (300 if fmt == "files" else 3)
    spec = describe_pool(str(tmp_path / "pool"))
    assert spec.format == fmt and spec.rows == 300

    got_ids, x, got_labels, shape = load_rows(str(tmp_path / "pool"))
    if fmt == "features":
        assert shape == (64,) and x.dtype == np.float32
        np.testing.assert_allclose(x, pixels[:300].reshape(300, 64) / 255.0, rtol=1e-6)
    elif fmt == "pixels":  # stored pixels keep their shape
        assert shape == (1, 8, 8) and x.dtype == np.uint8
        np.testing.assert_array_equal(x, pixels[:300])
    else:  # images become 3 channels by default (grayscale replicated)
        assert shape == (3, 8, 8) and x.dtype == np.uint8
        np.testing.assert_array_equal(x, np.repeat(pixels[:300], 3, axis=1))
    if fmt == "files":  # ids are keys under the prefix; image files carry no labels
        assert got_ids[3] == "part-00000/00000003.png" and got_labels is None
        assert is_image_prefix(str(tmp_path / "pool"))
    else:
        np.testing.assert_array_equal(got_ids, ids[:300])
        np.testing.assert_array_equal(got_labels, labels[:300])
        assert not is_image_prefix(str(tmp_path / "pool"))

    # A subset comes back in the order asked for, labels aligned.
    wanted = [got_ids[250], got_ids[7], got_ids[120]]
    sub_ids, sub_x, sub_labels, _ = load_rows(str(tmp_path / "pool"), ids=wanted)
    assert sub_ids.tolist() == wanted
    np.testing.assert_array_equal(sub_x, x[[250, 7, 120]])
    if got_labels is not None:
        np.testing.assert_array_equal(sub_labels, got_labels[[250, 7, 120]])
    with pytest.raises(ValueError, match="not found"):
        load_rows(str(tmp_path / "pool"), ids=[wanted[0], "nope" if fmt == "files" else 99_999])
    assert pool_has_ids(str(tmp_path / "pool"), [str(wanted[1]), "99999", "nope"]) == {str(wanted[1])}


def test_pool_on_s3_and_synthetic_sharding_is_stable(s3_bucket, tmp_path):
    pool = f"{s3_bucket}/pools/syn"
    files = make_pool(pool, "synthetic", rows=1000, fmt="pixels", shards=3, shape=(3, 4, 4), num_classes=4, seed=7)
    assert files == [f"{pool}/part-0000{i}.parquet" for i in range(3)]
    ids, x, labels, shape = load_rows(pool)
    assert shape == (3, 4, 4) and len(ids) == 1000 and set(labels.tolist()) == {0, 1, 2, 3}
    # The same ids written as one shard give the same rows.
    make_pool(str(tmp_path / "one"), "synthetic", rows=1000, fmt="pixels", shards=1, shape=(3, 4, 4),
              num_classes=4, seed=7)
    ids1, x1, labels1, _ = load_rows(str(tmp_path / "one"))
    np.testing.assert_array_equal(x, x1)
    np.testing.assert_array_equal(labels, labels1)
    spec = describe_pool(pool)
    assert spec.num_classes == 4 and spec.max_label == 3
    with pytest.raises(ValueError, match="already holds files"):
        make_pool(pool, "synthetic", rows=10)


def write(path, table: pa.Table):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path))
    return str(path)


def pixels_table(ids, n_bytes=64, shape=b"1x8x8"):
    return pa.table({"id": pa.array(ids, pa.int64()),
                     "pixels": pa.array([bytes(n_bytes)] * len(ids), pa.binary())}) \
        .replace_schema_metadata({SHAPE_KEY: shape})


def test_format_problems_fail_before_any_work_and_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="no pool at .*missing"):
        describe_pool(str(tmp_path / "missing"))

    bad = tmp_path / "unknown"
    write(bad / "part-0.parquet", pixels_table([1, 2]))
    (bad / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt: unknown file type"):
        describe_pool(str(bad))

    no_id = write(tmp_path / "noid" / "a.parquet", pa.table({"key": [1], "features": [[1.0]]}))
    with pytest.raises(ValueError, match=rf"{no_id}: no 'id' column"):
        describe_pool(str(tmp_path / "noid"))

    write(tmp_path / "nodata" / "a.parquet", pa.table({"id": [1], "label": [0]}))
    with pytest.raises(ValueError, match="a.parquet: unknown format"):
        describe_pool(str(tmp_path / "nodata"))

    write(tmp_path / "mixed" / "a.parquet", pixels_table([1]))
    second = write(tmp_path / "mixed" / "b.parquet",
                   pa.table({"id": pa.array([2], pa.int64()), "features": pa.array([[1.0]], pa.list_(pa.float32()))}))
    with pytest.raises(ValueError, match=rf"{second}: mixed formats"):
        describe_pool(str(tmp_path / "mixed"))

    write(tmp_path / "images" / "a.parquet", pixels_table([1]))
    (tmp_path / "images" / "x.png").write_bytes(png(np.zeros((8, 8), np.uint8)))
    with pytest.raises(ValueError, match=r"x\.png: mixed formats"):
        describe_pool(str(tmp_path / "images"))

    write(tmp_path / "noshape" / "a.parquet", pa.table({"id": [1], "pixels": [b"\0" * 4]}))
    with pytest.raises(ValueError, match="tidal_ray.shape"):
        describe_pool(str(tmp_path / "noshape"))

    write(tmp_path / "idtypes" / "a.parquet", pixels_table([1]))
    write(tmp_path / "idtypes" / "b.parquet",
          pa.table({"id": ["x"], "pixels": [bytes(64)]}).replace_schema_metadata({SHAPE_KEY: b"1x8x8"}))
    with pytest.raises(ValueError, match="b.parquet: mixed id types"):
        describe_pool(str(tmp_path / "idtypes"))


def test_checkpoint_compatibility_is_checked_from_metadata(tmp_path):
    make_pool(str(tmp_path / "p"), "digits", rows=50, fmt="pixels")
    spec = describe_pool(str(tmp_path / "p"))
    check_compatible(spec, (1, 8, 8), 10)
    check_compatible(spec, (3, 16, 16), 10)  # 1- or 3-channel pixels are converted and resized
    with pytest.raises(ValueError, match="1x8x8 pixels but ck expects 4x8x8"):
        check_compatible(spec, (4, 8, 8), 10, "ck")
    with pytest.raises(ValueError, match="declares 10 classes, ck has 5"):
        check_compatible(spec, (1, 8, 8), 5, "ck")
    # No declared class count: the label statistics in the footers still catch it.
    write(tmp_path / "q" / "a.parquet", pixels_table([1, 2]).append_column("label", pa.array([0, 7], pa.int64())))
    with pytest.raises(ValueError, match="has label 7"):
        check_compatible(describe_pool(str(tmp_path / "q")), (1, 8, 8), 5, "ck")
    make_pool(str(tmp_path / "img"), "digits", rows=20, fmt="image")
    check_compatible(describe_pool(str(tmp_path / "img")), (3, 16, 16), 10, "ck")  # resized on decode
    with pytest.raises(ValueError, match="pool rows are images but ck expects 64"):
        check_compatible(describe_pool(str(tmp_path / "img")), (64,), 10, "ck")
    make_pool(str(tmp_path / "f"), "digits", rows=20, fmt="features")
    with pytest.raises(ValueError, match="64 features but ck expects 32"):
        check_compatible(describe_pool(str(tmp_path / "f")), (32,), 10, "ck")


def test_decode_rejects_every_kind_of_bad_row(tmp_path):
    # pixels: a short row and a null id; the good rows decode zero-copy, in order
    table = pa.table({"id": pa.array([10, None, 12, 13], pa.int64()),
                      "pixels": pa.array([bytes([1]) * 64, bytes(64), bytes(63), bytes([4]) * 64])})
    write(tmp_path / "px" / "a.parquet", table.replace_schema_metadata({SHAPE_KEY: b"1x8x8"}))
    spec = describe_pool(str(tmp_path / "px"))
    good, rejects = decode_batch(table, spec, (1, 8, 8))
    assert good["id"].tolist() == [10, 13] and good["row"].tolist() == [0, 3]
    assert good["x"].shape == (2, 1, 8, 8) and good["x"][1].max() == 4
    assert rejects["id"].tolist() == [None, 12]
    assert rejects["reason"].tolist() == [NULL_ID, f"{WRONG_LENGTH}: 63 bytes, expected 64"]

    # features: NaN, inf, a wrong length
    rows = [[0.5] * 4, [np.nan, 0, 0, 0], [0, np.inf, 0, 0], [1.0] * 3]
    table = pa.table({"id": pa.array(["a", "b", "c", "d"]), "features": pa.array(rows, pa.list_(pa.float32()))})
    write(tmp_path / "ft" / "a.parquet", table)
    good, rejects = decode_batch(table, describe_pool(str(tmp_path / "ft")), (4,))
    assert good["id"].tolist() == ["a"] and good["x"].dtype == np.float32
    assert rejects["id"].tolist() == ["b", "c", "d"]
    assert rejects["reason"].tolist() == [NOT_FINITE, NOT_FINITE, f"{WRONG_LENGTH}: 3 features, expected 4"]

    # PNG bytes: corrupt, another size (resized and cropped to the input), missing
    blobs = [png(np.full((8, 8), 7, np.uint8)), b"\x89PNG not really", png(np.full((16, 24), 9, np.uint8)), None]
    table = pa.table({"id": pa.array([1, 2, 3, 4], pa.int64()), "image": pa.array(blobs, pa.binary())})
    write(tmp_path / "im" / "a.parquet", table)
    good, rejects = decode_batch(table, describe_pool(str(tmp_path / "im")), (1, 8, 8))
    assert good["id"].tolist() == [1, 3] and int(good["x"][0, 0, 0, 0]) == 7 and (good["x"][1] == 9).all()
    assert rejects["reason"].tolist() == [UNDECODABLE, UNDECODABLE]

    # One stream batch (an Arrow table) for the scorer: rejects keep a filled id and zero inputs.
    batch = stream_batch(good, rejects, (1, 8, 8), np.uint8)
    assert batch["id"].to_pylist() == [1, 3, 2, 4] and batch["reason"].to_pylist()[:2] == ["", ""]
    assert is_decoded(batch["reason"]).tolist() == [True, True, False, False]
    x = tensor_rows(batch["x"], (1, 8, 8))
    assert x.shape == (4, 1, 8, 8) and x[2:].max() == 0 and (x[:2] == good["x"]).all()


def test_load_rows_skips_bad_rows_and_keeps_the_first_duplicate(tmp_path, capsys):
    table = pa.table({"id": pa.array([1, 2, 2, 3], pa.int64()),
                      "pixels": pa.array([bytes([1]) * 4, bytes([2]) * 4, bytes([9]) * 4, bytes(3)]),
                      "label": pa.array([0, 1, 1, 0], pa.int64())}).replace_schema_metadata({SHAPE_KEY: b"1x2x2"})
    write(tmp_path / "p" / "a.parquet", table)
    ids, x, labels, shape = load_rows(str(tmp_path / "p"))
    assert ids.tolist() == [1, 2] and x[:, 0, 0, 0].tolist() == [1, 2] and labels.tolist() == [0, 1]
    assert "skipped 1 bad row" in capsys.readouterr().err


def test_list_float_features_pool_runs_a_campaign_cycle(ray_local, tmp_path, capsys):
    """``features`` as list<float> (what pandas and pa.array(list_of_lists) write): the
    dimension comes from the rows (8) and the rows of another length are rejects in scoring,
    never selected. An initial label on such a row (id 7) is left out of training with a
    warning and counted, by the local trainer as by the Ray trainer's ingest."""
    from tidal_ray.campaign import cycle as campaign
    from tidal_ray.cli import main
    from tidal_ray.data import storage

    rng = np.random.default_rng(0)
    labels = np.arange(240) % 3
    vectors = [list(rng.normal(label, 0.3, 8).astype(np.float32)) for label in labels]
    bad = [7, 100, 201]
    for i in bad:
        vectors[i] = vectors[i][:5]
    (tmp_path / "pool").mkdir()
    table = pa.table({"id": np.arange(240), "label": labels, "features": pa.array(vectors)})
    assert pa.types.is_list(table.schema.field("features").type)
    pq.write_table(table, str(tmp_path / "pool" / "part-0.parquet"))
    assert describe_pool(str(tmp_path / "pool")).shape == (8,)

    initial = tmp_path / "initial.csv"
    initial.write_text("id,label\n" + "".join(f"{i},{labels[i]}\n" for i in [7, *range(30, 60)]))
    root = str(tmp_path / "campaign")
    assert main(["campaign", "init", root, "--pool", str(tmp_path / "pool"), "--num-classes", "3", "--k", "10",
                 "--cycles", "1", "--epochs", "2", "--min-steps", "0", "--trainer", "local", "--oracle",
                 "--initial-labels-file", str(initial)]) == 0, capsys.readouterr().err
    assert main(["campaign", "run", root]) == 0, capsys.readouterr().err
    assert campaign.load_state(root)["status"] == "done"
    metrics = storage.read_json(campaign.cycle_uri(root, 0, "metrics.json"))
    assert metrics["labeled"] == 30 and metrics["labeled_rejected"] == 1
    selection = storage.read_json(campaign.cycle_uri(root, 0, "selection.json"))
    assert selection["rows_rejected"] == 3
    chosen = storage.read_parquet(campaign.cycle_uri(root, 0, "selection.parquet")).column("id").to_pylist()
    assert len(chosen) == 10 and not set(chosen) & set(bad)
