"""Checkpoint files: one ``model.pt`` holding plain tensors and Python values only,
so loading works with ``torch.load(..., weights_only=True)``."""
from __future__ import annotations

import io

import torch

from tidal_ray.data import storage
from tidal_ray.errors import BadInput
from tidal_ray.models import TiDALNet, build_model

CHECKPOINT_FILE = "model.pt"


def checkpoint_file(uri: str) -> str:
    """A checkpoint is named by its file or by the directory that holds ``model.pt``."""
    uri = str(uri)
    return uri if uri.endswith(".pt") else storage.join(uri, CHECKPOINT_FILE)


def save_checkpoint(state: dict, uri: str) -> str:
    buf = io.BytesIO()
    torch.save(state, buf)
    target = checkpoint_file(uri)
    storage.write_bytes(target, buf.getvalue())
    return target


def load_checkpoint(uri: str) -> dict:
    data = storage.read_bytes(checkpoint_file(uri))
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise BadInput(f"{checkpoint_file(uri)} is not a tidal-ray checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise BadInput(f"{checkpoint_file(uri)} is not a tidal-ray checkpoint")
    return state


def check_model_importable(state: dict) -> None:
    """A ``MODULE:FACTORY`` checkpoint needs MODULE importable in this process (and in
    the workers that rebuild it); a one-line BadInput naming it otherwise."""
    from tidal_ray.models.spec import import_factory

    if ":" in str(state["config"]["backbone"]):
        import_factory(state["config"]["backbone"], f"the checkpoint's model {state['config']['backbone']}")


def model_from_checkpoint(state: dict) -> TiDALNet:
    """The network the checkpoint's config describes (model spec, feature layers, input
    recipe), with its weights. A ``MODULE:FACTORY`` model needs MODULE importable here."""
    config = state["config"]
    layers = config.get("feature_layers")
    net = build_model(config["backbone"], config["num_classes"], tuple(config["input_shape"]),
                      tuple(layers) if layers else None, config.get("normalize", "none"))
    net.load_state_dict(state["model"])
    return net.eval()


def read_weights(uri: str) -> dict:
    """A state_dict from a local path or ``s3://`` URI, loaded with ``weights_only=True``."""
    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, OSError):
        raise BadInput(f"--weights {uri}: no such file") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(f"--weights {uri}: not a state_dict that loads with weights_only=True "
                       f"({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(f"--weights {uri}: expected a state_dict (names -> tensors)")
    return state
