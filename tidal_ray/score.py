"""Scoring: the batch scorer (one forward pass, every strategy) and the pipeline around it."""
from __future__ import annotations

import numpy as np
import torch

from .checkpoint import load_checkpoint, model_from_checkpoint
from .train import prepare_input
from .uncertainty import score_all


class BatchScorer:
    """Maps a batch ``{"id": ..., "x": (N, *input_shape)}`` to ids, predicted class and
    every strategy's score. The same class runs in-process and as a Ray Data actor."""

    def __init__(self, checkpoint_uri: str, seed: int = 0, mc_samples: int = 0, device: str | None = None):
        state = load_checkpoint(checkpoint_uri)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = model_from_checkpoint(state).to(self.device)
        self.input_shape = tuple(state["config"]["input_shape"])
        self.num_classes = int(state["config"]["num_classes"])
        self.seed, self.mc_samples = seed, mc_samples

    def __call__(self, batch: dict) -> dict:
        x = torch.as_tensor(np.ascontiguousarray(batch["x"]))
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"batch rows have shape {tuple(x.shape[1:])}, the checkpoint expects {self.input_shape}")
        logits, td_logits, mc = self.net.predict(prepare_input(x).to(self.device), self.mc_samples)
        scores = score_all(
            logits.float().cpu().numpy(), td_logits.float().cpu().numpy(), batch["id"], self.seed,
            None if mc is None else mc.float().cpu().numpy(),
        )
        return {"id": np.asarray(batch["id"]), **scores}
