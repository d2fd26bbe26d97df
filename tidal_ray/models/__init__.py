"""Backbones that return ``(logits, [stage features])``, the TiDAL network around them
(backbone + TD module) and ``prepare_input``, how a batch becomes the model's input."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import BadInput

from .hooked import HookedModel
from .resnet import ResNet18
from .small import MLP, SmallCNN
from .td_module import TDModule

BACKBONES = ("resnet18", "small_cnn", "mlp")


def build_backbone(name: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """``input_shape`` is one sample's shape: ``(C, H, W)`` for images, ``(D,)`` for features."""
    if name not in BACKBONES:
        raise BadInput(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if num_classes < 2:
        raise BadInput(f"num_classes must be at least 2, got {num_classes}")
    input_shape = tuple(int(d) for d in input_shape)
    if name == "mlp":
        if len(input_shape) != 1:
            raise BadInput(f"backbone 'mlp' takes feature vectors (D,), got input shape {input_shape}")
        return MLP(num_classes, input_dim=input_shape[0])
    if len(input_shape) != 3:
        raise BadInput(f"backbone {name!r} takes images (C, H, W), got input shape {input_shape}")
    if name == "resnet18":
        return ResNet18(num_classes, in_channels=input_shape[0])
    return SmallCNN(num_classes, in_channels=input_shape[0])


class TiDALNet(nn.Module):
    """Backbone plus TD prediction module; ``forward`` returns ``(logits, td_logits)``."""

    def __init__(self, backbone: nn.Module, num_classes: int, td_hidden_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.td_module = TDModule(backbone.feature_dims, num_classes, td_hidden_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.backbone(x)
        return logits, self.td_module(features)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, mc_samples: int = 0, row_keys=None):
        """Eval-mode logits and TD logits, plus ``mc_samples`` MC-dropout passes of the
        classifier head as probabilities ``(T, N, C)`` (None when ``mc_samples`` is 0).
        With ``row_keys`` (a uint64 ``ids.hash64`` per row) a row's dropout masks come
        from its key (``ids.row_uniforms``), not from torch's RNG, so its passes are the
        same whatever batch it is scored in."""
        logits, td_logits = self(x)
        if mc_samples <= 0:
            return logits, td_logits, None
        head = getattr(self.backbone, "head", None)
        if head is None or not hasattr(self.backbone, "forward_features"):
            raise BadInput("strategy 'bald' needs a built-in backbone with a dropout head")
        embedding, _ = self.backbone.forward_features(x)
        if row_keys is not None:
            from ..ids import row_uniforms

            passes = []
            for t in range(mc_samples):
                u = torch.from_numpy(row_uniforms(row_keys, t, embedding.shape[1])).to(embedding.device)
                passes.append(_head_with_dropout(head, embedding, u).softmax(dim=1))
            return logits, td_logits, torch.stack(passes)
        head.train()  # dropout on, for the head alone
        try:
            mc = torch.stack([head(embedding).softmax(dim=1) for _ in range(mc_samples)])
        finally:
            head.eval()
        return logits, td_logits, mc


def _head_with_dropout(head: nn.Module, z: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The head with its dropout applied by ``uniforms`` (keep where u >= p, scaled by
    1 / (1 - p), as ``nn.Dropout`` does in training)."""
    for module in head.children() if isinstance(head, nn.Sequential) else [head]:
        if isinstance(module, nn.Dropout):
            z = z * (uniforms >= module.p).to(z.dtype) / (1.0 - module.p) if module.p < 1 else torch.zeros_like(z)
        else:
            z = module(z)
    return z


def build_model(backbone: str, num_classes: int, input_shape: tuple[int, ...]) -> TiDALNet:
    return TiDALNet(build_backbone(backbone, num_classes, input_shape), num_classes)


def prepare_input(x: torch.Tensor) -> torch.Tensor:
    """How a batch becomes the model's float input: raw uint8 pixels become floats in
    [0, 1]; feature vectors pass through as float32."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


__all__ = ["BACKBONES", "HookedModel", "TDModule", "TiDALNet", "build_backbone", "build_model", "prepare_input"]
