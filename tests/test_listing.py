"""Listing a prefix without holding it: ``storage.iter_files`` walks a prefix in uri
order a page at a time (locally and on the loopback S3 server, through boto3), and an
image pool is kept as ranges of its listing that read tasks list again for themselves."""
import tracemalloc

import boto3
import numpy as np
import pytest

from tidal_ray.data import listing
from tidal_ray.data import storage
from tidal_ray.errors import BadInput
from tidal_ray.data.loader import load_rows
from tidal_ray.data.lookup import pool_has_ids
from tidal_ray.data.make_pool import make_pool
from tidal_ray.data.pool import describe_pool
from tidal_ray.data.read import read_unit, read_units

# Names whose uri order differs from a naive directory-by-directory walk:
# "a-b" < "a.png" < "a/..." < "a0" (as '-' < '.' < '/' < '0').
TRICKY = ["a/x.png", "a.png", "a-b.png", "a0.png", "a/b/c.png", "a/b.png", "b.png", "a/_SUCCESS", "z/y/x/w.png"]


def _write_local(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())


def test_local_listing_is_in_uri_order_and_resumes_after_any_uri(tmp_path):
    _write_local(tmp_path / "p", TRICKY)
    root = str(tmp_path / "p")
    listed = list(storage.iter_files(root))
    expected = sorted(f"{root}/{n}" for n in TRICKY)
    assert [u for u, _ in listed] == expected
    assert [s for _, s in listed] == [len(u[len(root) + 1:]) for u in expected]
    for i, after in enumerate(expected):
        assert [u for u, _ in storage.iter_files(root, start_after=after)] == expected[i + 1:]
        for j, last in enumerate(expected):  # a window: after one uri, up to another
            assert [u for u, _ in storage.iter_files(root, start_after=after, last=last)] == expected[i + 1:j + 1]
        assert [u for u, _ in storage.iter_files(root, last=after)] == expected[:i + 1]
    assert [u for u, _ in storage.iter_files(f"{root}/a.png")] == [f"{root}/a.png"]
    assert list(storage.iter_files(f"{root}/a.png", last=f"{root}/a-b.png")) == []
    assert list(storage.iter_files(f"{root}/missing")) == []


def test_s3_listing_pages_through_boto3_in_uri_order(s3_bucket):
    names = TRICKY + [f"many/{i:05d}.png" for i in range(2100)]  # more than two pages of 1000
    client = boto3.client("s3")
    bucket = s3_bucket[len("s3://"):]
    for name in names:
        client.put_object(Bucket=bucket, Key=f"pool/{name}", Body=name.encode())
    client.put_object(Bucket=bucket, Key="pool/dir-marker/", Body=b"")
    client.put_object(Bucket=bucket, Key="pool-other/a.png", Body=b"x")  # beside the prefix, not in it
    expected = sorted(f"{s3_bucket}/pool/{n}" for n in names)
    assert [u for u, _ in storage.iter_files(f"{s3_bucket}/pool")] == expected
    assert [u for u, _ in storage.iter_files(f"{s3_bucket}/pool/", start_after=expected[1500])] == expected[1501:]
    assert [u for u, _ in storage.iter_files(f"{s3_bucket}/pool", expected[3], expected[1200])] == expected[4:1201]
    assert list(storage.iter_files(f"{s3_bucket}/pool/a.png")) == [(f"{s3_bucket}/pool/a.png", 5)]


def test_ranges_stay_bounded_and_cover_the_listing_once(monkeypatch):
    monkeypatch.setattr(listing, "FILES_PER_RANGE", 2)
    monkeypatch.setattr(listing, "MAX_RANGES", 4)
    for n in (1, 2, 3, 7, 8, 16, 17, 100, 1001):
        uris = [f"s3://b/p/{i:05d}.png" for i in range(n)]
        ranges = listing._Ranges()
        for uri in uris:
            ranges.add(uri)
        runs = ranges.ranges()
        assert len(runs) <= 2 * 4 and sum(count for *_, count in runs) == n
        covered = []
        for after, last, first, count in runs:
            inside = [u for u in uris if after < u <= last]
            assert len(inside) == count and uris.index(inside[0]) == first
            covered += inside
        assert covered == uris


def test_an_image_pool_is_described_by_ranges_and_read_back_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "MAX_RANGES", 2)   # 300 files: runs of 64, then 128
    make_pool(str(tmp_path / "pool"), "digits", rows=300, fmt="files", shards=3)
    (tmp_path / "pool" / "README.txt").write_text("not a photo")
    spec = describe_pool(str(tmp_path / "pool"))
    assert spec.files == () and spec.rows == 300 and spec.skipped_count == 1
    assert [count for *_, count in spec.ranges] == [128, 128, 44]
    assert spec.bytes == sum(p.stat().st_size for p in (tmp_path / "pool").rglob("*.png"))

    rows = [t for unit in read_units(spec) for t in read_unit(unit, spec.slim(), max_bytes=2000)]
    files = np.concatenate([t.column("file").to_numpy() for t in rows])
    assert files.tolist() == list(range(300))
    assert max(t.num_rows for t in rows) <= 64 and min(t.num_rows for t in rows) >= 1
    paths = [p for t in rows for p in t.column("path").to_pylist()]
    assert paths == sorted(str(p) for p in (tmp_path / "pool").rglob("*.png"))

    # Many runs: read in fewer units (windows of runs, each listed once), every file once, in order.
    monkeypatch.setattr(listing, "FILES_PER_RANGE", 8)
    monkeypatch.setattr(listing, "MAX_RANGES", 4096)
    many = describe_pool(str(tmp_path / "pool"))
    units = read_units(many, cpus=1)
    assert len(many.ranges) == 38 and 4 <= len(units) < 38
    rows = [t for unit in units for t in read_unit(unit, many.slim())]
    assert np.concatenate([t.column("file").to_numpy() for t in rows]).tolist() == list(range(300))
    assert [p for t in rows for p in t.column("path").to_pylist()] == paths

    # A file added under the prefix after it was listed is caught, not silently skipped.
    unit = read_units(spec)[1]
    (tmp_path / "pool" / "part-00001" / "00000150a.png").write_bytes(b"late")
    with pytest.raises(BadInput, match="changed while it was scored: 129 image files .* 128 were listed"):
        list(read_unit(unit, spec.slim()))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_runs_join_into_windows_that_list_their_files_and_draw_by_position(where, tmp_path, monkeypatch, request):
    # 300 files in runs of 8 (38 runs); a window holds at most 40 files. On S3 only adjacent
    # runs join (a listing starts where asked); locally runs join across the ones between.
    from tidal_ray.data.lookup import image_ids_by_position

    monkeypatch.setattr(listing, "FILES_PER_RANGE", 8)
    monkeypatch.setattr(listing, "WINDOW_FILES", 40)
    root = f"{request.getfixturevalue('s3_bucket')}/pool" if where == "s3" else str(tmp_path / "pool")
    make_pool(root, "digits", rows=300, fmt="files", shards=3)
    spec = describe_pool(root)
    files = [uri for uri, _ in storage.iter_files(root)]
    assert len(spec.ranges) == 38
    wanted = [0, 1, 3, 4, 5, 9, 37]
    windows = listing.windows(spec, wanted)
    # (first run, run after the last) of each window; locally runs 0-4 hold 40 files, 5-9 the next 40
    expected = [(0, 2), (3, 6), (9, 10), (37, 38)] if where == "s3" else [(0, 5), (5, 10), (37, 38)]
    assert [(first // 8, -(-(first + count) // 8)) for _, _, first, count in windows] == expected
    for after, last, first, count in windows:
        assert [uri for uri, _ in listing.run_files(spec, after, last, count)] == files[first:first + count]
        assert count <= 40

    # A draw by position lists windows and picks the files at the drawn positions.
    for n, seed in [(1, 0), (12, 3), (300, 5)]:
        drawn = np.sort(np.random.default_rng(seed).choice(300, n, replace=False))
        assert image_ids_by_position(spec, n, seed) == [files[i][len(root) + 1:] for i in drawn]


def test_image_ids_are_looked_up_one_by_one_not_by_listing(tmp_path):
    make_pool(str(tmp_path / "pool"), "digits", rows=40, fmt="files", shards=2)
    (tmp_path / "pool" / "part-00000" / ".hidden.png").write_bytes(b"x")
    uri = str(tmp_path / "pool")
    present = "part-00001/00000030.png"
    asked = [present, "part-00000/missing.png", "part-00000/.hidden.png", "../pool/part-00001/00000030.png",
             "part-00000//00000001.png", ""]
    assert pool_has_ids(uri, asked) == {present}
    ids, x, _, shape = load_rows(uri, ids=[present])
    assert ids.tolist() == [present] and x.shape == (1, *shape)
    with pytest.raises(BadInput, match="not found"):
        load_rows(uri, ids=[present, "part-00000/missing.png"])


def test_describing_an_image_prefix_does_not_keep_its_listing(tmp_path):
    """Python allocations while describing 20,000 files are those of 2,000: the listing
    is walked, not kept (files spread over directories, as listed one at a time)."""
    def peak(n):
        root = tmp_path / f"pool{n}"
        for d in range(n // 100):
            (root / f"d{d:04d}").mkdir(parents=True)
            for i in range(100):
                (root / f"d{d:04d}" / f"{i:03d}-a-longish-photo-name.jpg").touch()
        tracemalloc.start()
        spec = describe_pool(str(root))
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert spec.rows == n
        return used

    small, large = peak(2_000), peak(20_000)
    assert large < small + (1 << 20), (small, large)


def test_a_missing_bucket_or_empty_prefix_is_bad_input_naming_it(s3_bucket):
    with pytest.raises(BadInput, match="no pool at s3://no-such-bucket-here/pool"):
        describe_pool("s3://no-such-bucket-here/pool")
    with pytest.raises(BadInput, match=f"no pool at {s3_bucket}/empty"):
        describe_pool(f"{s3_bucket}/empty")
