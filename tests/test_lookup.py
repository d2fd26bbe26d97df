"""Reading a few rows of a pool by id or position (``lookup.py``): the oracle's labels and
the initial random draw, against the whole pool read in memory as the reference."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tidal_ray.errors import BadInput
from tidal_ray.loader import load_rows
from tidal_ray.lookup import labels_of, rows_with_ids, sample_labels
from tidal_ray.make_pool import make_pool
from tidal_ray.pool import describe_pool


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
