"""``BatchScorer``: a decoded batch -> ids, predicted class and the scores the run needs.

The same class runs in-process and as a Ray Data actor (a GPU each when there are GPUs).
"""
from __future__ import annotations

import os

import numpy as np

from tidal_ray.errors import BadInput
from tidal_ray.method.batch import nearest_centroid, normalize_rows
from tidal_ray.method.uncertainty import STRATEGIES

BALD_SAMPLES = 20            # MC-dropout passes when bald is scored
PRECISIONS = ("fp32", "bf16")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
# TEST-ONLY (tests/README.md): a scorer actor given a GPU runs its model on the CPU, so
# GPU scheduling is testable on machines without CUDA.
GPU_AS_CPU_ENV = "TIDAL_RAY_TEST_GPU_AS_CPU"


def keep_freed_memory() -> None:
    """Lets this process's C allocator keep freed memory for reuse. glibc's defaults give
    it back to the OS almost at once (a trim above 128 KiB, and mmap for any block over
    128 KiB until a free raises that threshold), so a fresh scorer process page-faults
    on every batch's tensors: a cheap model's forward ran at half speed in a new process
    (benchmarks/score_overhead.py). Now blocks under 32 MiB come from the heap and are
    reused, and up to 128 MiB of free heap stays with the process. No-op where the C
    library is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_TRIM_THRESHOLD, 128 << 20)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's upper bound on 64-bit
    except (OSError, AttributeError):
        pass


def scorer_device(device: str | None) -> str:
    """The torch device a scorer uses: ``device`` (default: cuda when available), except
    that the test-only switch turns "cuda" into "cpu"."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and os.environ.get(GPU_AS_CPU_ENV) == "1":
        return "cpu"
    return device


class BatchScorer:
    """Maps a batch ``{"id", "x"}`` to ids, predicted class and the scores of
    ``strategies`` (default: every strategy; bald only with ``mc_samples``).

    Pipeline batches also carry ``reason`` (rows already rejected: "" = good), ``file``
    and ``row``; rejected rows pass through with NaN scores and class -1. With ``pad_to``,
    every forward pass sees exactly that many rows (the tail padded with zeros): CPU
    kernels pick different code paths for different batch sizes, and the padding keeps a
    row's score bit-identical however the pipeline happened to batch it.

    The cluster batch mode (DESIGN §8) uses the L2-normalised embedding of
    ``models.stage_embedding`` (the TiDALNet backbone's last stage, global-average-
    pooled). With ``centroids`` (K x d) every row also gets ``cluster``, its nearest
    centroid (-1 for rejected rows). With ``sample`` (``{"seed", "cycle",
    "threshold"}``) the scorer is the centroids' sampler instead: it keeps only the
    decoded rows whose ``method.batch.sample_hashes`` is at most the threshold and
    returns their ``id``, ``file``, ``row`` and ``embedding``, scoring nothing.

    With ``block_filter`` (``reduce.BlockFilter``) the scored output goes through it: the
    rows that cannot be selected stay here, counted."""

    def __init__(self, checkpoint_uri: str, seed: int = 0, mc_samples: int = 0, device: str | None = None,
                 *, strategies=None, pad_to: int | None = None, num_threads: int | None = None,
                 precision: str = "fp32", centroids=None, sample: dict | None = None, block_filter=None):
        import torch

        from tidal_ray.train.checkpoint import load_checkpoint, model_from_checkpoint

        keep_freed_memory()
        if num_threads:
            torch.set_num_threads(int(num_threads))
        state = load_checkpoint(checkpoint_uri)
        self.device = torch.device(scorer_device(device))
        self.net = model_from_checkpoint(state).to(self.device)
        # Convolutions on a GPU run fastest on channels-last tensors; the scores stay the same.
        self.channels_last = self.device.type == "cuda" and len(state["config"]["input_shape"]) == 3
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        # bf16 autocast changes scores slightly: a selection is repeatable per device and precision.
        self.precision = precision
        self.input_shape = tuple(state["config"]["input_shape"])
        self.num_classes = int(state["config"]["num_classes"])
        self.seed, self.mc_samples = seed, mc_samples
        self.strategies = None if strategies is None else tuple(strategies)
        self.pad_to = pad_to
        self.centroids = None if centroids is None else np.asarray(centroids, dtype=np.float32)
        self.sample = sample
        self.embed = self.centroids is not None or sample is not None
        self.block_filter = block_filter

    def _forward(self, x: np.ndarray, ids: np.ndarray):
        """Logits, TD logits, MC passes (or None) and, when the run needs them, each
        row's normalised embedding and cluster (else None)."""
        import torch

        from tidal_ray.method.hashing import hash64
        from tidal_ray.models import prepare_input

        keys = hash64(ids, self.seed) if self.mc_samples > 0 else None
        step = self.pad_to or max(len(x), 1)
        logits, td_logits, mc, embedding, cluster = [], [], [], [], []
        for start in range(0, len(x), step):
            chunk = x[start:start + step]
            n = len(chunk)
            chunk_keys = None if keys is None else keys[start:start + step]
            if n < step:
                chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), dtype=chunk.dtype)])
                chunk_keys = None if keys is None else np.concatenate([chunk_keys, np.zeros(step - n, np.uint64)])
            # A writable copy: Ray Data hands out read-only views of its blocks.
            raw = torch.from_numpy(np.array(chunk)).to(self.device, non_blocking=True)
            inputs = prepare_input(raw)
            if self.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                out = self.net.predict(inputs, self.mc_samples, row_keys=chunk_keys, embed=self.embed)
            logits.append(out[0][:n].float().cpu().numpy())
            td_logits.append(out[1][:n].float().cpu().numpy())
            if out[2] is not None:
                mc.append(out[2][:, :n].float().cpu().numpy())
            if self.embed:
                # Whole padded chunks, so a row's distances come from the same shapes in any batch.
                z = normalize_rows(out[3].float().cpu().numpy())
                embedding.append(z[:n])
                if self.centroids is not None:
                    cluster.append(nearest_centroid(z, self.centroids)[:n])
        return (np.concatenate(logits), np.concatenate(td_logits), (np.concatenate(mc, axis=1) if mc else None),
                np.concatenate(embedding) if embedding else None, np.concatenate(cluster) if cluster else None)

    def _names(self) -> tuple[str, ...]:
        if self.strategies is not None:
            return self.strategies
        return tuple(s for s in STRATEGIES if s != "bald" or self.mc_samples > 0)

    def __call__(self, batch):
        """``batch``: a dict of NumPy columns, or an Arrow table as ``decode.stream_batch``
        makes it (the pipeline's form). Returns the same kind."""
        import pyarrow as pa

        from tidal_ray.data.decode import is_decoded, numpy_column, tensor_rows
        from tidal_ray.method.uncertainty import score

        arrow = isinstance(batch, pa.Table)
        ids = numpy_column(batch, "id")
        x = tensor_rows(batch.column("x"), self.input_shape) if arrow else np.asarray(batch["x"])
        if tuple(x.shape[1:]) != self.input_shape:
            raise BadInput(f"batch rows have shape {tuple(x.shape[1:])}, the checkpoint expects {self.input_shape}")
        names = batch.column_names if arrow else list(batch)
        good = is_decoded(batch["reason"]) if "reason" in names else np.ones(len(ids), dtype=bool)
        if self.sample is not None:
            return self._sample(batch, arrow, names, ids, x, good)
        predicted = np.full(len(ids), -1, dtype=np.int64)
        columns = {name: np.full(len(ids), np.nan) for name in self._names()}
        if self.centroids is not None:
            columns["cluster"] = np.full(len(ids), -1, dtype=np.int32)
        if good.any():
            logits, td_logits, mc, _, cluster = self._forward(x[good] if not good.all() else x, ids[good])
            scores = score(self._names(), logits, td_logits, ids[good], self.seed, mc)
            predicted[good] = scores["predicted_class"]
            for name in self._names():
                columns[name][good] = scores[name]
            if cluster is not None:
                columns["cluster"][good] = cluster
        passed = [k for k in ("id", "file", "row", "reason") if k in names]
        if arrow:  # pass the input's columns through as they are
            out = pa.table({**{k: batch.column(k) for k in passed}, "predicted_class": pa.array(predicted),
                            **{k: pa.array(v) for k, v in columns.items()}})
        else:
            out = {**{k: np.asarray(batch[k]) for k in passed}, "predicted_class": predicted, **columns}
        return out if self.block_filter is None else self.block_filter(out)

    def _sample(self, batch, arrow, names, ids, x, good):
        """The centroids' sampler: the sampled decoded rows' positions and embeddings."""
        import pyarrow as pa

        from tidal_ray.method.batch import sample_hashes

        keep = np.flatnonzero(good)
        keep = keep[sample_hashes(ids[keep], self.sample["seed"], self.sample["cycle"])
                    <= np.uint64(self.sample["threshold"])]
        width = int(self.net.backbone.feature_dims[-1])
        embedding = self._forward(x[keep], ids[keep])[3] if len(keep) else np.zeros((0, width), np.float32)
        passed = [k for k in ("id", "file", "row") if k in names]
        if arrow:
            flat = pa.array(embedding.ravel(), pa.float32())
            return pa.table({**{k: batch.column(k).take(pa.array(keep, pa.int64())) for k in passed},
                             "embedding": pa.FixedSizeListArray.from_arrays(flat, embedding.shape[1])})
        return {**{k: np.asarray(batch[k])[keep] for k in passed}, "embedding": embedding}

