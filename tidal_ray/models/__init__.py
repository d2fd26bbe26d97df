"""Backbones that return ``(logits, [stage features])``, the TiDAL network around them
(backbone + TD module) and ``prepare_input``, how a batch becomes the model's input."""
from __future__ import annotations

import torch
from torch import nn

from tidal_ray.errors import BadInput

from tidal_ray.models.hooked import HookedModel
from tidal_ray.models.spec import build_backbone, default_model
from tidal_ray.models.td_module import TDModule

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZE_CHOICES = "none, imagenet or MEAN,STD (one value each, or one per channel)"


def parse_normalize(text: str, channels: int | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``--normalize`` -> ``(mean, std)`` on the [0, 1] scale, or None for ``none``.
    ``channels`` is None for feature vectors (only MEAN,STD applies to them)."""
    text = str(text or "none").strip().lower()
    if text == "none":
        return None
    if text == "imagenet":
        if channels not in (1, 3):
            raise BadInput("--normalize imagenet applies to 1- or 3-channel images")
        if channels == 1:
            return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
        return IMAGENET_MEAN, IMAGENET_STD
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    half = len(values) // 2
    if len(values) not in (2, 2 * (channels or 1)) or min(values[half:], default=0) <= 0:
        raise BadInput(f"--normalize {text!r}: expected {NORMALIZE_CHOICES}, with std > 0")
    return values[:half], values[half:]


class InputNorm(nn.Module):
    """The recorded normalisation, the network's first step: ``(x - mean) / std`` per
    channel on [0, 1] inputs (identity for ``none``). Non-persistent buffers: rebuilt
    from the checkpoint's config, never stored as weights."""

    def __init__(self, normalize: str = "none", input_shape: tuple[int, ...] = ()):
        super().__init__()
        channels = input_shape[0] if len(input_shape) == 3 else None
        parsed = parse_normalize(normalize, channels)
        self.active = parsed is not None
        mean, std = parsed or ((0.0,), (1.0,))
        view = (1, -1, 1, 1) if channels else (1, -1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(*view), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(*view), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std if self.active else x


class TiDALNet(nn.Module):
    """Backbone plus TD prediction module; ``forward`` returns ``(logits, td_logits)``."""

    def __init__(self, backbone: nn.Module, num_classes: int, td_hidden_dim: int = 128,
                 input_norm: InputNorm | None = None):
        super().__init__()
        self.input_norm = input_norm or InputNorm()
        self.backbone = backbone
        self.num_classes = num_classes
        self.td_module = TDModule(backbone.feature_dims, num_classes, td_hidden_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.backbone(self.input_norm(x))
        return logits, self.td_module(features)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, mc_samples: int = 0, row_keys=None, embed: bool = False):
        """Eval-mode logits and TD logits, plus ``mc_samples`` MC-dropout passes of the
        classifier head as probabilities ``(T, N, C)`` (None when ``mc_samples`` is 0).
        With ``row_keys`` (a uint64 ``hashing.hash64`` per row) a row's dropout masks come
        from its key (``hashing.row_uniforms``), not from torch's RNG, so its passes are the
        same whatever batch it is scored in. With ``embed``, a fourth item: each row's
        embedding (``stage_embedding``)."""
        logits, features = self.backbone(self.input_norm(x))
        td_logits = self.td_module(features)
        extra = (stage_embedding(features[-1]),) if embed else ()
        if mc_samples <= 0:
            return (logits, td_logits, None, *extra)
        head = getattr(self.backbone, "head", None)
        if head is None or not hasattr(self.backbone, "forward_features"):
            raise BadInput("strategy 'bald' needs a built-in backbone with a dropout head")
        embedding, _ = self.backbone.forward_features(self.input_norm(x))
        if row_keys is not None:
            from tidal_ray.method.hashing import row_uniforms

            passes = []
            for t in range(mc_samples):
                u = torch.from_numpy(row_uniforms(row_keys, t, embedding.shape[1])).to(embedding.device)
                passes.append(_head_with_dropout(head, embedding, u).softmax(dim=1))
            return (logits, td_logits, torch.stack(passes), *extra)
        head.train()  # dropout on, for the head alone
        try:
            mc = torch.stack([head(embedding).softmax(dim=1) for _ in range(mc_samples)])
        finally:
            head.eval()
        return (logits, td_logits, mc, *extra)


def stage_embedding(last_stage: torch.Tensor) -> torch.Tensor:
    """The embedding the cluster batch mode uses: the backbone's last stage output (the
    last of the TD module's feature layers), global-average-pooled over its spatial
    dimensions when it has any. For the built-in backbones this is the pooled
    penultimate feature that feeds the classifier head. Not yet L2-normalised (the
    scorer does that in NumPy)."""
    return last_stage.flatten(2).mean(dim=2) if last_stage.dim() > 2 else last_stage


def _head_with_dropout(head: nn.Module, z: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The head with its dropout applied by ``uniforms`` (keep where u >= p, scaled by
    1 / (1 - p), as ``nn.Dropout`` does in training)."""
    for module in head.children() if isinstance(head, nn.Sequential) else [head]:
        if isinstance(module, nn.Dropout):
            z = z * (uniforms >= module.p).to(z.dtype) / (1.0 - module.p) if module.p < 1 else torch.zeros_like(z)
        else:
            z = module(z)
    return z


def build_model(backbone: str, num_classes: int, input_shape: tuple[int, ...], feature_layers=None,
                normalize: str = "none") -> TiDALNet:
    """The TiDAL network for a model spec (``spec.build_backbone``) and an input recipe."""
    input_shape = tuple(int(d) for d in input_shape)
    return TiDALNet(build_backbone(backbone, num_classes, input_shape, feature_layers), num_classes,
                    input_norm=InputNorm(normalize, input_shape))


def prepare_input(x: torch.Tensor) -> torch.Tensor:
    """How a batch becomes the model's float input: raw uint8 pixels become floats in
    [0, 1]; feature vectors pass through as float32. Decoded images stay uint8 through
    Ray Data (4x less to move than floats); the recorded normalisation (``--normalize``)
    is the network's own first step (``InputNorm``), so every process that rebuilds the
    network from a checkpoint normalises alike."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


__all__ = ["HookedModel", "InputNorm", "TDModule", "TiDALNet", "build_backbone", "build_model",
           "default_model", "parse_normalize", "prepare_input", "stage_embedding"]
