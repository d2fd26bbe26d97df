"""Listing a pool's prefix, once and in order, a page at a time.

A prefix may hold millions of image files: the listing keeps parquet files in full (a
pool has few), image files as counts, a sample and the boundaries of runs of it
(``ranges``), which read tasks list again for themselves, so no process holds the whole
listing. Image ids are keys: they are looked up one by one, never found by listing.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from tidal_ray.data import storage
from tidal_ray.errors import BadInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SAMPLED_IMAGES = 16          # image files kept from the listing to settle the input size
SKIPPED_NAMES_KEPT = 10      # skipped files named (all are counted)
FILES_PER_RANGE = 64         # image files: the shortest run of the listing (runs join into windows)
MAX_RANGES = 4096            # longer runs beyond this many (at most twice as many runs)
WINDOW_FILES = 65536         # consecutive runs listed again as one window: at most this many files
PARQUET_SUFFIX = ".parquet"


def _kind_of_file(uri: str) -> str:
    lower = uri.lower()
    if storage.is_hidden(uri):
        return "hidden"
    if lower.endswith(PARQUET_SUFFIX):
        return "parquet"
    if lower.endswith(IMAGE_SUFFIXES):
        return "image"
    return "other"


class _Ranges:
    """Cuts a listing of image files, seen once in order, into runs of equal length (a
    power of two times ``FILES_PER_RANGE``) by keeping each run's last uri; when there
    are ``2 * MAX_RANGES`` runs, every other boundary goes and runs double, so memory
    stays bounded however many files the prefix holds."""

    def __init__(self):
        self.step, self.ends, self.count, self.last = FILES_PER_RANGE, [], 0, None

    def add(self, uri: str) -> None:
        self.count += 1
        self.last = uri
        if self.count % self.step == 0:
            self.ends.append(uri)
            if len(self.ends) >= 2 * MAX_RANGES:
                self.ends, self.step = self.ends[1::2], self.step * 2

    def ranges(self) -> tuple[tuple[str, str, int, int], ...]:
        ends = self.ends + ([self.last] if self.count % self.step else [])
        return tuple((ends[i - 1] if i else "", end, i * self.step, min(self.step, self.count - i * self.step))
                     for i, end in enumerate(ends))


@dataclass
class _Listing:
    """One pass over a prefix, kept small: parquet files in full (a pool has few),
    image files as counts, a sample and ranges, skipped files as a count and names."""
    parquet: list = field(default_factory=list)
    images: _Ranges = field(default_factory=_Ranges)
    image_bytes: int = 0
    sample: list = field(default_factory=list)
    hidden: list = field(default_factory=list)       # the first few hidden and marker files
    hidden_count: int = 0
    others: list = field(default_factory=list)       # the first few files of no pool kind
    other_count: int = 0
    unused: list = field(default_factory=list)       # the first few hidden or other files, in order

    def add(self, uri: str, size: int) -> None:
        kind = _kind_of_file(uri)
        if kind == "parquet":
            self.parquet.append((uri, size))
        elif kind == "image":
            self.images.add(uri)
            self.image_bytes += size
            if len(self.sample) < SAMPLED_IMAGES:
                self.sample.append(uri)
        else:
            if kind == "hidden":
                self.hidden_count += 1
                _keep_first(self.hidden, uri)
            else:
                self.other_count += 1
                _keep_first(self.others, uri)
            _keep_first(self.unused, uri)


def _keep_first(names: list, uri: str) -> None:
    if len(names) < SKIPPED_NAMES_KEPT:
        names.append(uri)


def list_pool(uri: str) -> tuple[str, _Listing]:
    """``(kind, listing)``: kind is ``parquet`` or ``image``. Hidden and marker files are
    skipped in any pool, other keys beside image files too; any other file beside
    parquet files is an error naming it. One pass over the listing, a page at a time."""
    listing = _Listing()
    try:
        for file_uri, size in storage.iter_files(uri):
            listing.add(file_uri, size)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as e:  # no permission, no connection
        raise BadInput(f"cannot list the pool {uri}: {e}") from None
    parquet, images = len(listing.parquet), listing.images.count
    if not (parquet or images or listing.hidden_count or listing.other_count):
        raise BadInput(f"no pool at {uri}: the prefix does not exist or holds no files")
    if parquet and images:
        raise BadInput(f"{listing.sample[0]}: mixed formats under {uri}: image files next to parquet files")
    if not (parquet or images):
        shown = (listing.others or listing.hidden)[0]
        raise BadInput(f"{uri}: no parquet or image files (*.parquet, *.png|*.jpg|*.jpeg|*.webp) to use, "
                       f"{listing.hidden_count + listing.other_count} skipped (e.g. {shown})")
    if parquet and listing.other_count:
        raise BadInput(f"{listing.others[0]}: unknown file type in a parquet pool "
                       f"(expected *.parquet; names starting with '_' or '.' are skipped)")
    return ("parquet" if parquet else "image"), listing


def is_image_prefix(uri: str) -> bool:
    """True when the pool is image files under a prefix (ids are keys relative to it)."""
    return list_pool(uri)[0] == "image"


def image_files(spec, start_after: str = "", last: str | None = None):
    """Yield the pool's image files as ``(uri, size)`` in pool order, listing as it goes:
    those after ``start_after`` and up to ``last`` (a range of ``spec.ranges``)."""
    for uri, size in storage.iter_files(spec.uri, start_after or None, last):
        if _kind_of_file(uri) == "image":
            yield uri, size


def run_files(spec, after: str, last: str, count: int, when: str = "since it was listed") -> list[tuple[str, int]]:
    """The image files of one run of ``spec.ranges``, listed again; BadInput (saying the
    pool changed ``when``) if it no longer holds the ``count`` files it held when listed."""
    files = list(image_files(spec, after, last))
    if len(files) != count:
        raise BadInput(f"{spec.uri}: the pool changed {when}: {len(files)} image files up to {last}, "
                       f"where {count} were listed")
    return files


def windows(spec, runs) -> list[tuple[str, str, int, int]]:
    """The runs ``runs`` (sorted indices into ``spec.ranges``) joined into windows to list
    again, ``(after, last, first, count)`` like a run, of at most ``WINDOW_FILES`` files
    (a longer run alone). On S3 a listing starts where it is asked to, so only adjacent
    runs join; a local directory is read whole by every listing of it, so runs join across
    the ones between them (those are listed too, and counted)."""
    joined = []   # [first run, last run] pairs
    across_gaps = not storage.is_s3(spec.uri)
    for run in runs:
        if joined and (across_gaps or run == joined[-1][1] + 1) and \
                spec.ranges[run][2] + spec.ranges[run][3] - spec.ranges[joined[-1][0]][2] <= WINDOW_FILES:
            joined[-1][1] = run
        else:
            joined.append([run, run])
    return [(spec.ranges[a][0], spec.ranges[b][1], spec.ranges[a][2],
             spec.ranges[b][2] + spec.ranges[b][3] - spec.ranges[a][2]) for a, b in joined]


def image_keys_present(spec, keys) -> list[bool]:
    """Which of ``keys`` (ids of an image-file pool) are image files in it, asking for
    those files alone (a few at a time), never listing the prefix."""
    fs = storage.resolve(spec.uri)[0]

    def present(key: str) -> bool:
        return _is_image_key(key) and \
            fs.get_file_info(storage.resolve(spec.key_uri(key))[1]).type == pafs.FileType.File

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(present, [str(k) for k in keys]))


def _is_image_key(key: str) -> bool:
    """A key that names an image file inside the prefix: no empty, '.' or '..' parts."""
    parts = key.split("/")
    return bool(key) and not any(p in ("", ".", "..") for p in parts) and _kind_of_file(key) == "image"
