"""Reading a few rows of a pool by id or position (``lookup.py``): the oracle's labels and
the initial random draw, against the whole pool read in memory as the reference."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tidal_ray.errors import BadInput
from tidal_ray.data.loader import load_rows
from tidal_ray.data.lookup import labels_of, rows_with_ids, sample_labels
from tidal_ray.data.make_pool import make_pool
from tidal_ray.data.pool import describe_pool


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("lookup") / "pool")
    make_pool(uri, source="synthetic", rows=3000, fmt="features", shards=3, shape="8")
    return uri


def test_initial_draw_is_the_in_memory_draw_over_pool_order(pool):
    ids, _, labels, _ = load_rows(pool)
    drawn = sample_labels(describe_pool(pool), 50, seed=7)
    rows = np.sort(np.random.default_rng(7).choice(len(ids), size=50, replace=False))
    assert drawn.column("id").to_pylist() == ids[rows].tolist()
    assert drawn.column("label").to_pylist() == labels[rows].tolist()
    with pytest.raises(BadInput, match="more than the pool's 3000 rows"):
        sample_labels(describe_pool(pool), 3001, seed=0)


def test_oracle_labels_in_the_order_asked(pool):
    ids, _, labels, _ = load_rows(pool)
    wanted = [2999, 0, 1500, 1001]
    got_ids, got_labels = labels_of(describe_pool(pool), wanted)
    assert got_ids.tolist() == wanted and got_labels.tolist() == labels[wanted].tolist()
    with pytest.raises(BadInput, match="1 requested id"):
        labels_of(describe_pool(pool), [1, 3000])


def test_row_groups_without_a_wanted_id_are_skipped_by_their_statistics(tmp_path):
    """Ids 0..999 in ten row groups of 100: asking for ids 250 and 251 reads one group's
    data; the positions are the rows' own in the file; a repeated id comes back twice."""
    path = str(tmp_path / "p.parquet")
    ids = np.concatenate([np.arange(1000), [251]])
    pq.write_table(pa.table({"id": ids, "label": ids % 10}), path, row_group_size=100)
    found = list(rows_with_ids(path, pa.array([251, 250, 5000]), ["id", "label"]))
    assert [t.column("id").to_pylist() for t, _ in found] == [[250, 251], [251]]
    assert [rows.tolist() for _, rows in found] == [[250, 251], [1000]]


def test_an_undecodable_earliest_duplicate_loses_everywhere(tmp_path, ray_local):
    """Id 5 is in the pool twice: first with pixels of the wrong length (label 1), then a
    good row (label 2). Scoring, the oracle, in-memory loads and training all take the
    good row, as DESIGN §2 says: the earliest *decodable* row wins."""
    from tidal_ray.data.pool import SHAPE_KEY
    from tidal_ray.score.pipeline import score_pool
    from tidal_ray.train.checkpoint import save_checkpoint
    from tidal_ray.train.config import TrainConfig
    from tidal_ray.train.ingest import labeled_rows
    from tidal_ray.train.loop import train_in_process

    rng = np.random.default_rng(0)
    good = rng.integers(0, 256, size=(12, 64), dtype=np.uint8)
    pixels = [good[i].tobytes() for i in range(12)]
    ids = list(range(12))
    labels = [i % 3 for i in ids]
    pixels[5], labels[5] = b"short", 1                     # row 5: id 5, undecodable
    ids.append(5), pixels.append(good[11].tobytes()), labels.append(2)   # row 12: id 5 again, good
    pool = tmp_path / "pool"
    pool.mkdir()
    table = pa.table({"id": pa.array(ids, pa.int64()), "pixels": pa.array(pixels, pa.binary()),
                      "label": pa.array(labels, pa.int64())})
    pq.write_table(table.replace_schema_metadata({SHAPE_KEY: b"1x8x8"}), str(pool / "part-0.parquet"),
                   row_group_size=5)
    spec = describe_pool(str(pool))

    got_ids, got_labels = labels_of(spec, [5, 4])
    assert got_ids.tolist() == [5, 4] and got_labels.tolist() == [2, 1]
    got_ids, x, got_labels, _ = load_rows(str(pool), ids=[5])
    assert got_labels.tolist() == [2] and x[0].tobytes() == good[11].tobytes()

    rows = labeled_rows(str(pool), [5, 0], [2, 0], input_shape=(1, 8, 8))
    batch = rows.dataset.take_all()
    five = [r for r in batch if r["id"] == 5]
    assert len(five) == 1 and five[0]["x"].tobytes() == good[11].tobytes() and rows.rejected == 0

    config = TrainConfig(num_classes=3, input_shape=(1, 8, 8), backbone="small_cnn", epochs=1, batch_size=8)
    x_all = np.stack([g.reshape(1, 8, 8) for g in good[:4]])
    net, table_td, session = train_in_process(config, [0, 1, 2, 3], x_all, [0, 1, 2, 0])
    save_checkpoint(session.last_state, str(tmp_path / "ckpt"))
    summary = score_pool(str(tmp_path / "ckpt"), str(pool), 12, str(tmp_path / "out"), strategy="random",
                         use_ray=False, progress=False)
    rejects = pq.read_table(str(tmp_path / "out" / "rejects.parquet")).to_pylist()
    assert [(r["id"], r["reason"].split(":")[0]) for r in rejects] == [(5, "wrong tensor length")]
    assert summary["rows_scored"] == 12


def test_id_statistics_are_found_by_column_path_after_a_struct_column(tmp_path):
    """A struct column of two leaves comes before ``id``: by Arrow field index, ``id`` would
    be leaf 1 (the struct's second leaf, whose values are far from every id), so the row
    groups holding the wanted ids would be skipped and the ids "not found"."""
    ids = np.arange(1000)
    meta = pa.StructArray.from_arrays([pa.array(ids + 10**6), pa.array(ids + 2 * 10**6)], ["a", "b"])
    features = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(2000, np.float32)), 2)
    (tmp_path / "pool").mkdir()
    pq.write_table(pa.table({"meta": meta, "id": ids, "label": ids % 7, "features": features}),
                   str(tmp_path / "pool" / "part-0.parquet"), row_group_size=100)
    spec = describe_pool(str(tmp_path / "pool"))
    wanted = [950, 3, 420]
    got_ids, got_labels = labels_of(spec, wanted)
    assert got_ids.tolist() == wanted and got_labels.tolist() == [950 % 7, 3 % 7, 420 % 7]
    found = list(rows_with_ids(str(tmp_path / "pool" / "part-0.parquet"), pa.array([420, 3]), ["id", "label"]))
    assert [t.column("id").to_pylist() for t, _ in found] == [[3], [420]]


def test_repeated_id_pre_pass_holds_a_few_row_groups_not_the_file(tmp_path):
    """Driver memory of ``read.repeated_ids`` on one file of 400k rows in row groups of
    1000: Arrow's peak (a pool of its own) and Python's (tracemalloc: NumPy and the seen-id
    set) stay far under the file's id column (3.2 MB), which the earlier pre-pass read whole."""
    import tracemalloc

    from tidal_ray.data.read import repeated_ids

    rows = 400_000
    ids = np.concatenate([np.arange(rows - 1), [123]])  # one id repeated, in the last row group
    features = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2 * rows, np.float32)), 2)
    (tmp_path / "pool").mkdir()
    pq.write_table(pa.table({"id": ids, "features": features}), str(tmp_path / "pool" / "big.parquet"),
                   row_group_size=1000)
    spec = describe_pool(str(tmp_path / "pool"))
    column_bytes = ids.nbytes

    arrow = pa.proxy_memory_pool(pa.default_memory_pool())
    previous = pa.default_memory_pool()
    pa.set_memory_pool(arrow)
    tracemalloc.start()
    try:
        repeated = repeated_ids(spec)
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)
    assert repeated.tolist() == [123]
    assert arrow.max_memory() < column_bytes / 4, arrow.max_memory()
    assert python_peak < column_bytes / 4, python_peak


def test_rows_drawn_by_position_from_a_row_group_of_wide_rows_are_read_a_bounded_batch_at_a_time(tmp_path):
    """A row group of 20,000 encoded images of 5 kB (100 MB): drawing 20 rows of it by
    position (the typical draw's sample read) takes those rows in batches of about
    ``BATCH_BYTES``, Arrow's peak far under the row group (18 MB); in 65,536-row batches
    it was 171 MB."""
    from tidal_ray.data.lookup import BATCH_BYTES, rows_by_position

    rows, width = 20_000, 5_000
    rng = np.random.default_rng(0)
    (tmp_path / "pool").mkdir()
    pq.write_table(pa.table({"id": np.arange(rows), "image": pa.array([rng.bytes(width) for _ in range(rows)])}),
                   str(tmp_path / "pool" / "wide.parquet"), row_group_size=rows)
    spec = describe_pool(str(tmp_path / "pool"))

    arrow = pa.proxy_memory_pool(pa.default_memory_pool())
    previous = pa.default_memory_pool()
    pa.set_memory_pool(arrow)
    try:
        drawn = rows_by_position(spec, 20, 3, ["id", "image"])
        ids, widths = drawn.column("id").to_pylist(), [len(b) for b in drawn.column("image").to_pylist()]
        del drawn  # its buffers belong to the proxy pool
    finally:
        pa.set_memory_pool(previous)
    assert ids == np.sort(np.random.default_rng(3).choice(rows, 20, replace=False)).tolist()
    assert widths == [width] * 20
    assert arrow.max_memory() < min(rows * width / 4, 8 * BATCH_BYTES), arrow.max_memory()
