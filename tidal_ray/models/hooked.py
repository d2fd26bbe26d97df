"""Wrap a user's own classifier: name the layers whose outputs feed the TD module."""
from __future__ import annotations

import torch
from torch import nn

from tidal_ray.errors import BadInput


class HookedModel(nn.Module):
    """Any ``nn.Module`` that maps inputs to logits, made to return ``(logits, [features])``.

    The named submodules' outputs are captured with forward hooks, in the order given.
    A forward pass on a dummy batch of two sizes the TD module (``feature_dims``) and
    records the logits' shape (``probed_logits_shape``) for the caller to check.
    """

    def __init__(self, module: nn.Module, feature_layers: list[str], input_shape: tuple[int, ...]):
        super().__init__()
        if not feature_layers:
            raise BadInput("name at least one layer to feed the TD module")
        names = dict(module.named_modules())
        missing = [n for n in feature_layers if n not in names]
        if missing:
            raise BadInput(f"unknown layer(s) {missing}; the model has: {sorted(n for n in names if n)}")
        self.module = module
        self.feature_layers = list(feature_layers)
        self._captured: dict[str, torch.Tensor] = {}
        for name in feature_layers:
            names[name].register_forward_hook(self._capture(name))
        self.feature_dims = self._probe_feature_dims(input_shape)

    def _capture(self, name: str):
        def hook(_module, _inputs, output):
            self._captured[name] = output

        return hook

    def _probe_feature_dims(self, input_shape: tuple[int, ...]) -> list[int]:
        was_training = self.training
        self.eval()
        with torch.no_grad():
            logits, features = self(torch.zeros(2, *input_shape))
        self.train(was_training)
        self.probed_logits_shape = tuple(logits.shape)
        for name, f in zip(self.feature_layers, features):
            if not isinstance(f, torch.Tensor) or f.dim() < 2:
                raise BadInput(f"feature layer {name!r} outputs {type(f).__name__}, not a (batch, ...) tensor")
        return [f.shape[1] for f in features]

    def forward(self, x):
        self._captured = {}
        logits = self.module(x)
        if not isinstance(logits, torch.Tensor):
            raise TypeError("the wrapped model must return a logits tensor")
        return logits, [self._captured[name] for name in self.feature_layers]
