"""The TD prediction module: predicts a sample's training dynamics from backbone features."""
from __future__ import annotations

import torch
from torch import nn


def pool_feature(feature: torch.Tensor) -> torch.Tensor:
    """One vector per sample: global-average-pool conv maps, flatten anything else."""
    if feature.dim() > 2:
        return feature.flatten(2).mean(dim=2)
    return feature


class TDModule(nn.Module):
    """Per stage: GAP -> linear -> ReLU; concatenate; linear to C logits."""

    def __init__(self, feature_dims: list[int], num_classes: int, hidden_dim: int = 128):
        super().__init__()
        if not feature_dims:
            raise ValueError("the TD module needs at least one feature stage")
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden_dim), nn.ReLU()) for d in feature_dims
        )
        self.out = nn.Linear(hidden_dim * len(feature_dims), num_classes)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.stages):
            raise ValueError(f"TD module expects {len(self.stages)} feature stages, got {len(features)}")
        hidden = [stage(pool_feature(f)) for stage, f in zip(self.stages, features)]
        return self.out(torch.cat(hidden, dim=1))
