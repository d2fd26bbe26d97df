"""The labeled rows of a pool as a training dataset (``labeled.py``) on a real local Ray:
the rows and their TD indices match the pool, duplicates and bad rows are decided like
scoring decides them, and a labeled id missing from the pool is bad input."""
import numpy as np
import pyarrow as pa
import pytest

from tidal_ray.data import storage
from tidal_ray.errors import BadInput
from tidal_ray.train.ingest import labeled_rows
from tidal_ray.data.make_pool import make_pool

DIM = 4


def features_file(uri, ids, values):
    values = np.asarray(values, dtype=np.float32)
    storage.write_parquet(uri, pa.table({
        "id": pa.array(ids, pa.int64()),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), DIM),
        "label": pa.array(np.zeros(len(ids)), pa.int64())}))


def rows_by_index(rows):
    return sorted(rows.dataset.take_all(), key=lambda r: r["index"])


def test_rows_indices_and_labels_match_the_pool(ray_local, s3_bucket):
    pool = f"{s3_bucket}/pool"
    make_pool(pool, source="synthetic", rows=500, fmt="features", shards=3, shape=str(DIM))
    wanted, labels = [420, 3, 250, 17, 499], [1, 2, 3, 4, 5]
    rows = labeled_rows(pool, wanted, labels)
    assert rows.ids.tolist() == wanted and rows.labels.tolist() == labels and rows.rejected == 0
    got = rows_by_index(rows)
    assert [(r["id"], r["index"], r["label"]) for r in got] == list(zip(wanted, range(5), labels))
    from tidal_ray.data.make_pool import synthetic_rows

    pixels, _ = synthetic_rows(np.array(wanted), (DIM,), 10, 0)
    assert np.allclose(np.stack([r["x"] for r in got]), pixels / 255.0)


def test_first_good_row_wins_and_undecodable_ids_are_left_out(ray_local, tmp_path, capsys):
    """Id 7 is in both files: NaN first, good second (the good row stands for it). Id 8's
    only row is NaN: left out and counted. Id 9 is repeated in one file: the first wins."""
    pool = tmp_path / "pool"
    nan = [np.nan] * DIM
    features_file(str(pool / "a.parquet"), [7, 8, 9, 9], [nan, nan, [1] * DIM, [2] * DIM])
    features_file(str(pool / "b.parquet"), [7, 10], [[3] * DIM, [4] * DIM])
    rows = labeled_rows(str(pool), [10, 8, 9, 7], [0, 1, 2, 3])
    assert rows.ids.tolist() == [10, 9, 7] and rows.labels.tolist() == [0, 2, 3]
    assert rows.rejected == 1 and rows.first_rejected.startswith("8: NaN/inf")
    assert "left out 1 labeled id(s)" in capsys.readouterr().err
    got = rows_by_index(rows)
    assert [(r["id"], r["index"], r["label"], float(r["x"][0])) for r in got] == [(10, 0, 0, 4.0), (9, 1, 2, 1.0),
                                                                                  (7, 2, 3, 3.0)]


def test_image_files_read_only_the_labeled_keys_and_missing_ids_are_bad_input(ray_local, tmp_path):
    pool = str(tmp_path / "files")
    make_pool(pool, source="synthetic", rows=12, fmt="files", shape="3x8x8")
    rows = labeled_rows(pool, ["00000011.png", "00000002.png"], [1, 0])
    got = rows_by_index(rows)
    assert [(r["id"], r["index"], r["x"].shape) for r in got] == [("00000011.png", 0, (3, 8, 8)),
                                                                  ("00000002.png", 1, (3, 8, 8))]
    with pytest.raises(BadInput, match="1 labeled id\\(s\\) not found .* 'nope.png'"):
        labeled_rows(pool, ["00000002.png", "nope.png"], [0, 1])
