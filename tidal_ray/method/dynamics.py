"""The TD table: per labeled sample, the running mean of its softmax probabilities.

Stored as a float64 sum and an observation count per sample, so that the mean is
``sum / count`` and merging ranks is exact addition. Observations made during an
epoch are kept apart ("pending") and folded in at epoch end, after the all-reduce
across DDP ranks, so every rank holds the same table and a sample seen by any
rank (or dropped by a shard) counts exactly as many times as it was seen.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class TDTable:
    def __init__(self, num_samples: int, num_classes: int, device: torch.device | str = "cpu"):
        self.num_samples = int(num_samples)
        self.num_classes = int(num_classes)
        self.epoch = 0
        self.sum = torch.zeros(num_samples, num_classes, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_samples, dtype=torch.int64, device=device)
        self.pending_sum = torch.zeros_like(self.sum)
        self.pending_count = torch.zeros_like(self.count)

    @property
    def mean(self) -> torch.Tensor:
        """Running mean per sample; rows never observed are zero."""
        return self.sum / self.count.clamp(min=1).unsqueeze(1)

    def target(self, index: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """TD target for samples ``index`` observed now with ``probs``: (m*t + p)/(t+1)."""
        index = index.to(self.sum.device)
        t = self.count[index].unsqueeze(1)
        target = (self.sum[index] + probs.detach().to(torch.float64)) / (t + 1)
        return target.to(probs.dtype).to(probs.device)

    def record(self, index: torch.Tensor, probs: torch.Tensor) -> None:
        """Remember this step's observations until the epoch ends."""
        index = index.to(self.sum.device)
        self.pending_sum.index_add_(0, index, probs.detach().to(self.sum.device, torch.float64))
        self.pending_count.index_add_(0, index, torch.ones_like(index, dtype=torch.int64))

    def end_epoch(self) -> None:
        """All-reduce this epoch's observations across ranks (when distributed) and fold them in."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.pending_sum)
            dist.all_reduce(self.pending_count)
        self.sum += self.pending_sum
        self.count += self.pending_count
        self.pending_sum.zero_()
        self.pending_count.zero_()
        self.epoch += 1

    def to(self, device) -> "TDTable":
        for name in ("sum", "count", "pending_sum", "pending_count"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def state_dict(self) -> dict:
        if self.pending_count.any():
            raise RuntimeError("TD table has observations not yet folded in; call end_epoch() first")
        return {"sum": self.sum.cpu(), "count": self.count.cpu(), "epoch": self.epoch}

    @classmethod
    def from_state_dict(cls, state: dict, device="cpu") -> "TDTable":
        num_samples, num_classes = state["sum"].shape
        table = cls(num_samples, num_classes, device)
        table.sum.copy_(state["sum"])
        table.count.copy_(state["count"])
        table.epoch = int(state["epoch"])
        return table

