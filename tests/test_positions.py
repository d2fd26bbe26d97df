"""Where a selected row lives (DESIGN §2): selection.parquet's ``file``, ``row_group`` and
``row`` name the row itself, the winning one of a repeated id; training and the oracle read
those positions directly, the same rows as by id, and never touch a row group that holds
no labeled row."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tidal_ray.campaign.labeling import sample_refs
from tidal_ray.data import storage
from tidal_ray.data.lookup import labels_of, rows_at_positions, winning_positions
from tidal_ray.data.make_pool import synthetic_rows
from tidal_ray.data.pool import describe_pool
from tidal_ray.errors import BadInput

from test_score_identity import make_duplicate_pool
from test_score_pipeline import train_checkpoint

DIM = 64
GROUP_ROWS = 100
POSITIONS = ["id", "file", "row_group", "row"]


def features_pool(root, files=3, rows_per_file=400) -> str:
    """Shuffled int ids (row group statistics rule nothing out), row groups of 100 rows."""
    os.makedirs(root, exist_ok=True)
    ids = np.random.default_rng(3).permutation(files * rows_per_file).astype(np.int64)
    pixels, labels = synthetic_rows(ids, (DIM,), 10, seed=0)
    values = pixels.astype(np.float32) / 255.0
    for f in range(files):
        part = slice(f * rows_per_file, (f + 1) * rows_per_file)
        pq.write_table(pa.table({"id": ids[part],
                                 "features": pa.FixedSizeListArray.from_arrays(pa.array(values[part].ravel()), DIM),
                                 "label": labels[part],
                                 "source": [f"s3://originals/{i}.jpg" for i in ids[part]]}),
                       f"{root}/part-{f:05d}.parquet", row_group_size=GROUP_ROWS)
    return root


def id_at(spec, file, row_group, row):
    """The id at a position, read with pyarrow alone."""
    pf = pq.ParquetFile(storage.resolve(spec.files[file][0])[1])
    start = sum(pf.metadata.row_group(g).num_rows for g in range(row_group))
    return pf.read_row_group(row_group, columns=["id"]).column("id")[row - start].as_py()


def earliest_positions(spec) -> dict:
    """Each id's earliest (file, row) in the pool, read with pyarrow alone."""
    first = {}
    for f, (uri, _) in enumerate(spec.files):
        for row, i in enumerate(pq.read_table(storage.resolve(uri)[1], columns=["id"]).column("id").to_pylist()):
            first.setdefault(i, (f, row))
    return first


def corrupt_row_group(path, group):
    """Overwrite every column chunk of one row group with garbage (the footer stays)."""
    meta = pq.ParquetFile(path).metadata.row_group(group)
    with open(path, "r+b") as f:
        for j in range(meta.num_columns):
            chunk = meta.column(j)
            start = chunk.dictionary_page_offset or chunk.data_page_offset
            f.seek(start)
            f.write(b"\xff" * chunk.total_compressed_size)


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory):
    return train_checkpoint(tmp_path_factory.mktemp("ck-positions") / "mlp", input_shape=(DIM,), backbone="mlp",
                            epochs=1, rows=400)


def test_image_pool_selection_names_the_winning_row_of_each_id(tmp_path):
    """PNG pool in row groups of 200, 240 and 20, ids repeated in the last file: each
    selected position holds the selected id, and it is the id's earliest row."""
    from tidal_ray.score.pipeline import score_pool

    checkpoint = train_checkpoint(tmp_path / "ck", epochs=1, rows=300)
    pool = make_duplicate_pool(str(tmp_path))
    # k above the 1,693 distinct ids: every id is picked, the repeated ones included.
    score_pool(checkpoint, pool, 2_000, str(tmp_path / "out"), strategy="entropy", use_ray=False, progress=False)
    selection = storage.read_parquet(str(tmp_path / "out" / "selection.parquet"))
    spec = describe_pool(pool)
    first = earliest_positions(spec)
    picked = selection.select(POSITIONS).to_pylist()
    assert len(picked) == 1_693 and {3, 17, 450, 1_199, 1_250, 1_679} <= {p["id"] for p in picked}
    for p in picked:
        assert id_at(spec, p["file"], p["row_group"], p["row"]) == p["id"]
        assert (p["file"], p["row"]) == first[p["id"]]
    assert selection.schema.field("row_group").type == pa.int32()


def test_features_pool_positions_feed_training_and_the_oracle(ray_local, tmp_path, mlp_checkpoint):
    """On Ray: the selection's positions hold its ids; training from them gives the same
    rows, indices, labels and data as training found by id; the oracle's labels agree."""
    from tidal_ray.score.pipeline import score_pool
    from tidal_ray.train.ingest import labeled_rows

    pool = features_pool(str(tmp_path / "pool"))
    summary = score_pool(mlp_checkpoint, pool, 60, str(tmp_path / "out"), strategy="margin", progress=False)
    assert summary["rows_scored"] == 1_200
    selection = storage.read_parquet(str(tmp_path / "out" / "selection.parquet"))
    spec = describe_pool(pool)
    assert len({(p["file"], p["row_group"]) for p in selection.to_pylist()}) > 3   # spread over row groups
    for p in selection.select(POSITIONS).to_pylist():
        assert id_at(spec, p["file"], p["row_group"], p["row"]) == p["id"]

    ids = selection.column("id").to_numpy()
    labels = np.arange(len(ids)) % 10
    by_position = labeled_rows(pool, ids, labels, spec=spec, positions=selection.select(POSITIONS))
    by_id = labeled_rows(pool, ids, labels, spec=spec)

    def rows(labeled):
        return sorted(((r["id"], r["index"], r["label"], r["x"].tobytes()) for r in labeled.dataset.take_all()))

    assert rows(by_position) == rows(by_id) and len(rows(by_id)) == 60
    assert by_position.ids.tolist() == by_id.ids.tolist() and by_position.rejected == 0

    asked = ids[::-1].tolist()
    got = labels_of(spec, asked, positions=selection.select(POSITIONS))
    assert [g.tolist() for g in got] == [g.tolist() for g in labels_of(spec, asked)]
    at = rows_at_positions(spec, *(selection.column(c).to_numpy() for c in POSITIONS[1:]), ["label"])
    assert sorted(at.column("id").to_pylist()) == sorted(ids.tolist())


def test_reading_by_position_never_touches_row_groups_without_labels(ray_local, tmp_path):
    """Labeled rows in 3 of the 12 row groups; the other 9 are overwritten with garbage
    after the positions were looked up. Training, the oracle and the labeling export by
    position read the 3 and reject nothing; found by id, the garbage is read and the read
    fails."""
    from tidal_ray.train.ingest import labeled_rows

    pool = features_pool(str(tmp_path / "pool"))
    spec = describe_pool(pool)
    keep = {(0, 0), (0, 2), (1, 3)}   # (file, row group)
    wanted = []
    for f, g in sorted(keep):
        groups = pq.read_table(storage.resolve(spec.files[f][0])[1], columns=["id"]).column("id").to_numpy()
        wanted += groups[g * GROUP_ROWS:(g + 1) * GROUP_ROWS][[5, 50, 99]].tolist()
    positions = winning_positions(spec, wanted)
    assert positions.num_rows == 9
    for f in range(3):
        for g in range(4):
            if (f, g) not in keep:
                corrupt_row_group(storage.resolve(spec.files[f][0])[1], g)

    rows = labeled_rows(pool, wanted, np.arange(9) % 10, spec=spec, positions=positions)
    assert rows.rejected == 0 and sorted(r["id"] for r in rows.dataset.take_all()) == sorted(wanted)
    got_ids, got_labels = labels_of(spec, wanted, positions=positions)
    _, truth = synthetic_rows(np.array(wanted), (DIM,), 10, seed=0)
    assert got_ids.tolist() == wanted and got_labels.tolist() == truth.tolist()
    selection = positions.append_column("rank", pa.array(np.arange(1, 10)))
    refs = sample_refs(selection, spec, str(tmp_path / "export"))
    assert refs == [{"text": str(i), "source": f"s3://originals/{i}.jpg"} for i in selection.column("id").to_pylist()]
    with pytest.raises(Exception):
        labeled_rows(pool, wanted, np.arange(9) % 10, spec=spec)
    with pytest.raises(Exception):
        labels_of(spec, wanted)
    with pytest.raises(Exception):
        sample_refs(selection.select(["id", "rank"]), spec, str(tmp_path / "export"))


def test_a_position_that_no_longer_holds_its_id_is_bad_input(tmp_path):
    """The pool was rewritten under the positions: the oracle refuses, naming the id."""
    pool = features_pool(str(tmp_path / "pool"), files=1)
    spec = describe_pool(pool)
    positions = winning_positions(spec, [7, 8])
    moved = positions.set_column(3, "row", pa.array(positions.column("row").to_numpy() ^ 1))
    with pytest.raises(BadInput, match="7|8"):
        labels_of(spec, [7, 8], positions=moved)
