"""A model spec -> the backbone the TiDAL network is built around.

A spec is a built-in name (``resnet18``, ``small_cnn``, ``mlp``) or ``MODULE:FACTORY``:
``FACTORY(num_classes=C)`` returns an ``nn.Module`` mapping a float batch to logits,
wrapped in ``HookedModel`` so the named layers (``feature_layers``; default
``layer1``..``layer4`` when the module has them) feed the TD module. ``--weights``
start it from a state_dict (local or ``s3://``, ``weights_only=True``); classifier-head
tensors whose shape does not fit C stay freshly initialised. Every problem is a
``BadInput`` naming the culprit, found by ``train.config.check_model`` before any data is read.
"""
from __future__ import annotations

import importlib
import os
import sys

from torch import nn

from tidal_ray.errors import BadInput
from tidal_ray.models.hooked import HookedModel
from tidal_ray.models.resnet import ResNet18
from tidal_ray.models.small import MLP, SmallCNN

BUILTINS = ("resnet18", "small_cnn", "mlp")
DEFAULT_LAYERS = ("layer1", "layer2", "layer3", "layer4")  # torchvision's ResNets name their stages so
SMALL_IMAGE_MAX = 64      # images up to this size get the small CNN by default, larger ones ResNet-18
NAMES_SHOWN = 6           # keys or layers named in one error line


def default_model(input_shape) -> str:
    """The model that follows the pool: an MLP for feature vectors, the small CNN for
    small images, ResNet-18 for larger ones."""
    if len(input_shape) == 1:
        return "mlp"
    return "small_cnn" if max(input_shape[1:]) <= SMALL_IMAGE_MAX else "resnet18"


def name_list(names, shown: int = NAMES_SHOWN) -> str:
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def import_factory(spec: str, where: str | None = None):
    """``MODULE:FACTORY`` -> the factory. The user's current directory counts as a place
    to import from (a console script's ``sys.path`` lacks it). ``where`` names the spec
    in errors (default ``--model SPEC``)."""
    where = where or f"--model {spec}"
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise BadInput(f"{where}: expected a built-in name ({', '.join(BUILTINS)}) or MODULE:FACTORY")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BadInput(f"{where}: cannot import module {module_name!r} ({e}); run from the directory "
                       f"that holds it, put it on PYTHONPATH, or ship it with the job's --working-dir") from None
    except Exception as e:  # the user's module raised while importing
        raise BadInput(f"{where}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise BadInput(f"{where}: module {module_name!r} has no callable {attr!r}")
    return factory


def _builtin(name: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    if name == "mlp":
        if len(input_shape) != 1:
            raise BadInput(f"backbone 'mlp' takes feature vectors (D,), got input shape {input_shape}")
        return MLP(num_classes, input_dim=input_shape[0])
    if len(input_shape) != 3:
        raise BadInput(f"backbone {name!r} takes images (C, H, W), got input shape {input_shape}")
    if name == "resnet18":
        return ResNet18(num_classes, in_channels=input_shape[0])
    return SmallCNN(num_classes, in_channels=input_shape[0])


def _user_model(spec: str, num_classes: int, input_shape: tuple[int, ...], feature_layers) -> HookedModel:
    factory = import_factory(spec)
    try:
        module = factory(num_classes=num_classes)
    except Exception as e:
        raise BadInput(f"--model {spec}: FACTORY(num_classes={num_classes}) raised {type(e).__name__}: {e}") from None
    if not isinstance(module, nn.Module):
        raise BadInput(f"--model {spec}: the factory returned a {type(module).__name__}, not a torch.nn.Module")
    layers = list(feature_layers or [])
    if not layers:
        present = dict(module.named_modules())
        layers = [n for n in DEFAULT_LAYERS if n in present]
        if not layers:
            raise BadInput(f"--model {spec}: no layer1..layer4 to feed the TD module; name some with --feature-layers")
    unknown = [n for n in layers if n not in dict(module.named_modules())]
    if unknown:
        raise BadInput(f"--feature-layers: {name_list(unknown)} not found in {spec} "
                       f"(its layers: {name_list([n for n, _ in module.named_children()], 12)})")
    try:
        hooked = HookedModel(module, layers, input_shape)
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"--model {spec}: a forward pass on a dummy batch of shape {(2, *input_shape)} "
                       f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if hooked.probed_logits_shape != (2, num_classes):
        raise BadInput(f"--model {spec}: logits have shape {hooked.probed_logits_shape} for a batch of 2, "
                       f"expected (2, {num_classes}) (batch, classes)")
    return hooked


def build_backbone(name: str, num_classes: int, input_shape: tuple[int, ...], feature_layers=None) -> nn.Module:
    """``input_shape`` is one sample's shape: ``(C, H, W)`` for images, ``(D,)`` for features."""
    if num_classes < 2:
        raise BadInput(f"num_classes must be at least 2, got {num_classes}")
    input_shape = tuple(int(d) for d in input_shape)
    if ":" in name:
        return _user_model(name, num_classes, input_shape, feature_layers)
    if name not in BUILTINS:
        raise BadInput(f"unknown model {name!r}; choose one of {', '.join(BUILTINS)} or give MODULE:FACTORY")
    if feature_layers:
        raise BadInput(f"--feature-layers applies to MODULE:FACTORY models; {name!r} knows its own stages")
    return _builtin(name, num_classes, input_shape)


def apply_weights(backbone: nn.Module, state: dict, num_classes: int, uri: str) -> list[str]:
    """Load ``state`` into the backbone (the user's module inside a ``HookedModel``).
    Returns the classifier-head keys left freshly initialised (shape does not fit C);
    any other missing, unexpected or mis-shaped key is a BadInput naming them."""
    target = backbone.module if isinstance(backbone, HookedModel) else backbone
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    head = [k for k in misshaped if own[k].ndim >= 1 and own[k].shape[0] == num_classes]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in misshaped if k not in head]
    problems = [f"{what}: {name_list(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)) if keys]
    if problems:
        raise BadInput(f"--weights {uri}: keys do not fit the model ({'; '.join(problems)})")
    target.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
    return head
