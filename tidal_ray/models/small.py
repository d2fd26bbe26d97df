"""Small backbones: a 3-stage CNN for 8x8..32x32 images and an MLP for feature-vector pools."""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, dropout: float = 0.2):
        super().__init__()
        w = width
        self.stages = nn.ModuleList([
            nn.Sequential(*_conv_bn_relu(in_channels, w), *_conv_bn_relu(w, w), nn.MaxPool2d(2)),
            nn.Sequential(*_conv_bn_relu(w, 2 * w), nn.MaxPool2d(2)),
            nn.Sequential(*_conv_bn_relu(2 * w, 4 * w)),
        ])
        self.feature_dims = [w, 2 * w, 4 * w]
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * w, num_classes))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return x.mean(dim=(2, 3)), features

    def forward(self, x):
        embedding, features = self.forward_features(x)
        return self.head(embedding), features


class MLP(nn.Module):
    def __init__(self, num_classes: int, input_dim: int, hidden: tuple[int, ...] = (256, 128), dropout: float = 0.2):
        super().__init__()
        dims = [input_dim, *hidden]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()) for a, b in zip(dims, dims[1:])
        )
        self.feature_dims = list(hidden)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden[-1], num_classes))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, features = x.flatten(1), []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return x, features

    def forward(self, x):
        embedding, features = self.forward_features(x)
        return self.head(embedding), features
