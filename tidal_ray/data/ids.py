"""Sample ids: the one place that converts them between Arrow, NumPy and user files,
and checks them.

A pool's ids are int64 or string (``id_type``). On the driver and in decoded batches
they are NumPy arrays: int64, or str for string ids. Ids typed by people (CSV cells,
JSON values, exclude files) are converted here, with a one-line error when they do not
fit the pool. Duplicates are decided here: ``SeenIds`` finds the ids seen before (in
pool order: ``repeated_ids``, the in-memory loader) and ``EarliestRows`` picks, among
the rows of a repeated id offered in any order, the one at the earliest position.
The id hash itself is ``method.hashing.hash64``.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from tidal_ray.data import storage
from tidal_ray.errors import BadInput
from tidal_ray.method.hashing import hash64


def kind_of(t: pa.DataType) -> str | None:
    """"int" or "str" for a column type that can hold ids, else None."""
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    return None


def is_string(id_type: pa.DataType) -> bool:
    return id_type == pa.string()


def empty(id_type: pa.DataType) -> np.ndarray:
    return np.array([], dtype=str if is_string(id_type) else np.int64)


def to_numpy(values, id_type: pa.DataType) -> np.ndarray:
    """Arrow or NumPy ids as the driver holds them: an int64 or a str array."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        values = values.to_numpy(zero_copy_only=False)
    values = np.asarray(values)
    return values.astype(str) if is_string(id_type) else values.astype(np.int64, copy=False)


def from_user(values, id_type: pa.DataType, where: str) -> pa.Array:
    """Ids given by a person or a caller (any Python values) as an Arrow array of the
    pool's type; BadInput naming ``where`` when one cannot be one."""
    values = list(values)
    try:
        if is_string(id_type):
            return pa.array([str(v) for v in values], pa.string())
        return pa.array([int(v) for v in values], pa.int64())
    except (TypeError, ValueError):
        raise BadInput(f"{where}: ids must be {'strings' if is_string(id_type) else 'integers'} "
                       f"to match the pool's ids") from None


def cast(arr, id_type: pa.DataType, where: str) -> pa.Array:
    """An Arrow id column of another file as the pool's id type."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    try:
        return arr.cast(id_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise BadInput(f"{where}: ids are {arr.type} and do not match the pool's {id_type} ids") from None


def as_text(value, id_type: pa.DataType) -> str:
    """The text form under which a person's id matches a pool id ("007" is id 7)."""
    text = str(value).strip()
    if not is_string(id_type):
        try:
            return str(int(text))
        except ValueError:
            pass
    return text


def parse_keys(keys, id_type: pa.DataType) -> pa.Array:
    """Text keys as pool ids, leaving out those that cannot be one (they match nothing)."""
    if is_string(id_type):
        return pa.array([str(k) for k in keys], pa.string())
    parsed = []
    for k in keys:
        try:
            parsed.append(int(str(k).strip()))
        except ValueError:
            continue
    return pa.array(parsed, pa.int64())


def sorted_unique(arrays: list[pa.Array], id_type: pa.DataType) -> np.ndarray:
    if not arrays:
        return empty(id_type)
    return np.unique(to_numpy(pa.concat_arrays([a.cast(id_type) for a in arrays]), id_type))


def check_unique(ids: np.ndarray, where: str) -> None:
    if len(np.unique(ids)) != len(ids):
        values, counts = np.unique(ids, return_counts=True)
        raise BadInput(f"{where} has duplicate ids (e.g. {values[counts > 1][0]!r})")


def is_member(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """For each of ``ids``, whether it is in ``sorted_ids`` (sorted, unique): the one
    sorted-membership test."""
    if len(sorted_ids) == 0 or len(ids) == 0:
        return np.zeros(len(ids), dtype=bool)
    pos = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
    return sorted_ids[pos] == ids


def find(have: np.ndarray, wanted: np.ndarray, where: str) -> np.ndarray:
    """Indices into ``have`` (unique ids) of each of ``wanted``, in ``wanted``'s order;
    BadInput naming the first one that is not there."""
    order = np.argsort(have, kind="stable")
    at = np.searchsorted(have[order], wanted).clip(max=max(len(have) - 1, 0))
    found = have[order][at] == wanted if len(have) else np.zeros(len(wanted), dtype=bool)
    if not found.all():
        raise BadInput(f"{int((~found).sum())} requested id(s) not found in {where} "
                       f"(e.g. {wanted[~found].tolist()[0]!r})")
    return order[at]


def earliest_rows(ids: np.ndarray, positions: np.ndarray, good: np.ndarray | None = None) -> np.ndarray:
    """Which of several rows with one id wins (DESIGN §2): the index of each id's row at
    the smallest ``position`` (file, then row) among the ``good`` (decodable) rows, in
    position order. Ids without a good row have none. ``EarliestRows`` is the same rule
    for rows that arrive one batch at a time, ``SeenIds`` for rows read in pool order."""
    candidates = np.arange(len(ids)) if good is None else np.flatnonzero(good)
    by_id = candidates[np.lexsort((positions[candidates], ids[candidates]))]
    _, first = np.unique(ids[by_id], return_index=True)
    winners = by_id[first]
    return winners[np.argsort(positions[winners], kind="stable")]


def read_id_files(uris, id_type: pa.DataType, option: str = "--exclude") -> list[pa.Array]:
    """The ``id`` column of parquet/csv files (or prefixes of them), as the pool's id type."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    found = []
    for uri in uris:
        try:
            files = [f for f in storage.list_files(uri) if not storage.is_hidden(f[0])]  # _SUCCESS etc.
        except (FileNotFoundError, OSError):
            files = []
        if not files:
            raise BadInput(f"{option} {uri}: nothing there")
        for f, _ in files:
            fs, path = storage.resolve(f)
            if storage.is_hidden(f):
                continue
            if f.endswith(".parquet"):
                with fs.open_input_file(path) as handle:
                    schema = pq.read_schema(handle)
                    if "id" not in schema.names:
                        raise BadInput(f"{f}: an {option} file needs an 'id' column")
                    handle.seek(0)
                    column = pq.read_table(handle, columns=["id"]).column("id")
            elif f.endswith(".csv"):
                options = pacsv.ConvertOptions(column_types={"id": id_type}, include_columns=["id"])
                try:
                    with fs.open_input_stream(path) as handle:
                        column = pacsv.read_csv(handle, convert_options=options).column("id")
                except (pa.ArrowInvalid, KeyError) as e:
                    raise BadInput(f"{f}: not a CSV with an 'id' column of the pool's id type "
                                   f"({str(e).splitlines()[0]})") from None
            else:
                raise BadInput(f"{f}: {option} files must be parquet or csv with an 'id' column")
            found.append(cast(column, id_type, f).drop_null())
    return found


def repeated_ids(id_chunks, id_type: pa.DataType) -> np.ndarray:
    """The ids that occur more than once across ``id_chunks`` (Arrow or NumPy id arrays,
    nulls ignored), sorted unique. Memory: a ``SeenIds`` and the repeats."""
    seen, repeats = SeenIds(), [empty(id_type)]
    for chunk in id_chunks:
        if isinstance(chunk, (pa.Array, pa.ChunkedArray)):
            chunk = chunk.drop_null()
        ids = to_numpy(chunk, id_type)
        repeats.append(ids[~seen.first_seen(ids)])
    return np.unique(np.concatenate(repeats))


class EarliestRows:
    """Among the rows of repeated ids, offered in any order with their positions, the
    one at the earliest position wins (DESIGN §2: file order, then row order within the
    file). Holds one row per repeated id; ``repeated`` is sorted unique."""

    def __init__(self, repeated: np.ndarray):
        self.repeated = repeated
        self.best: dict = {}      # id -> (position, payload)

    def candidates(self, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` are repeated ids, whose rows must go through ``offer``."""
        return is_member(self.repeated, ids)

    def offer(self, sample_id, position, payload):
        """Keep this row if it is the earliest of its id so far; returns the payload that
        lost (this one or the one it displaced), or None."""
        held = self.best.get(sample_id)
        if held is None:
            self.best[sample_id] = (position, payload)
            return None
        if position < held[0]:
            self.best[sample_id] = (position, payload)
            return held[1]
        return payload

    def winners(self) -> list:
        return [payload for _, payload in self.best.values()]


class SeenIds:
    """Every id seen so far, so the first row of an id wins and later ones are duplicates.

    The one structure on the driver that grows with the pool. Dense non-negative integer
    ids (the usual 0..N-1) cost one bit per id value: a bitmap, grown while it stays
    under a byte per id seen. Other ids go to sorted runs of fixed-width keys, 8 bytes
    per integer id and 16 per string id (two 64-bit ``hash64`` lanes: a collision, odds
    about N^2 / 2^129 for well-mixed hashes, would reject a good row as a duplicate). Runs merge like a binary
    counter, so a lookup searches O(log N) of them."""

    MIN_BITMAP_BYTES = 1 << 20

    def __init__(self):
        self._bits = np.zeros(0, dtype=np.uint8)
        self._runs: list[np.ndarray] = []
        self._count = 0

    @staticmethod
    def _keys(ids: np.ndarray) -> np.ndarray:
        if ids.dtype.kind in "iu":
            return ids.astype(np.int64, copy=False)
        lanes = np.stack([hash64(ids, 0x5EED1), hash64(ids, 0x5EED2)], axis=1)
        return np.ascontiguousarray(lanes).view("S16").ravel()

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return self._bits.nbytes + sum(r.nbytes for r in self._runs)

    def _in_bitmap(self, keys: np.ndarray) -> np.ndarray:
        if keys.dtype.kind != "i":
            return np.zeros(len(keys), dtype=bool)
        return (keys >= 0) & (keys < 8 * len(self._bits))

    def _contains(self, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(len(keys), dtype=bool)
        mapped = self._in_bitmap(keys)
        if mapped.any():
            k = keys[mapped]
            found[mapped] = (self._bits[k >> 3] >> (k & 7).astype(np.uint8)) & 1 == 1
        for run in self._runs:
            found |= is_member(run, keys)
        return found

    def _add(self, keys: np.ndarray) -> None:
        self._count += len(keys)
        if keys.dtype.kind == "i" and len(keys) and keys[-1] >= 8 * len(self._bits):
            wanted = int(keys[-1]) // 8 + 1
            if wanted <= max(self.MIN_BITMAP_BYTES, self._count):  # dense enough for a bitmap
                grown = np.zeros(max(wanted, 2 * len(self._bits)), dtype=np.uint8)
                grown[:len(self._bits)] = self._bits
                self._bits = grown
        mapped = self._in_bitmap(keys)
        if mapped.any():
            k = keys[mapped]
            np.bitwise_or.at(self._bits, k >> 3, (1 << (k & 7)).astype(np.uint8))
        rest = keys[~mapped]
        if len(rest):
            self._runs.append(rest)
            while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
                last = self._runs.pop()
                merged = np.concatenate([self._runs.pop(), last])
                merged.sort(kind="stable")
                self._runs.append(merged)

    def first_seen(self, ids: np.ndarray) -> np.ndarray:
        """True for each row whose id was not seen before (the first of repeats in ``ids``)."""
        if len(ids) == 0:
            return np.zeros(0, dtype=bool)
        unique, first = np.unique(self._keys(ids), return_index=True)
        fresh = ~self._contains(unique)
        mask = np.zeros(len(ids), dtype=bool)
        mask[first[fresh]] = True
        self._add(unique[fresh])
        return mask
