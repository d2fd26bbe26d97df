"""A campaign's state under one URI: its config, where each thing lives (DESIGN.md §2),
and the labels that have arrived (one file per arrival, never rewritten)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pyarrow as pa

from tidal_ray.data import storage
from tidal_ray.errors import BadInput
from tidal_ray.method.uncertainty import DEFAULT_STRATEGY


@dataclass
class CampaignConfig:
    pool: str
    num_classes: int
    k: int
    cycles: int
    strategy: str = DEFAULT_STRATEGY
    backbone: str | None = None   # the model spec (built-in name or MODULE:FACTORY); init settles the default
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    lam: float = 1.0
    seed: int = 0
    initial_labels: int = 0
    oracle: bool = False
    test: str | None = None
    trainer: str = "ray"          # "ray" (Ray Train, DDP) or "local" (in the driver process)
    workers: int = 1
    use_gpu: bool = False
    actors: tuple[int, int] = (1, 1)
    per_class_quota: bool = False
    # Worker-group restarts per training run; each resumes from the run's last checkpoint.
    max_failures: int = 2
    feature_layers: tuple[str, ...] | None = None
    weights: str | None = None
    image_size: int | None = None
    channels: int | None = None
    normalize: str = "none"
    augment: bool = False
    class_names: list[str] | None = None
    presign: int | None = None    # seconds: Label Studio tasks get presigned HTTPS URLs
    batch_mode: str = "topk"      # DESIGN §8; check() settles the mode's parameters
    beta: float | None = None
    clusters: int | None = None
    candidates: int | None = None
    # The scaled recipe: every training runs at least `epochs` epochs and never fewer than
    # `min_steps` optimiser steps (train.config.scaled_epochs). 0 here (exact epochs, as
    # campaigns made before it); `campaign init --min-steps` defaults to 300.
    min_steps: int = 0
    # Each cycle starts from the previous cycle's weights. False here (from scratch, as
    # campaigns made before it); `campaign init` defaults to --warm-start.
    warm_start: bool = False
    initial_draw: str = "random"  # random | typical (TypiClust), for --initial-labels N

    def check(self) -> None:
        from tidal_ray.method.batch import check_batch_params
        from tidal_ray.method.uncertainty import check_strategy

        check_strategy(self.strategy)
        if self.k > 0:
            params = check_batch_params(self.batch_mode, self.k, self.beta, self.clusters, self.candidates)
            self.beta, self.clusters, self.candidates = params.beta, params.clusters, params.candidates
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise BadInput(f"--class-names: {len(self.class_names)} names for {self.num_classes} classes "
                           f"({', '.join(self.class_names[:12])})")
        if self.presign is not None and self.presign <= 0:
            raise BadInput(f"--presign {self.presign}: must be a positive number of seconds")
        for flag, value in (("--k", self.k), ("--cycles", self.cycles)):
            if value <= 0:
                raise BadInput(f"{flag} {value}: must be a positive integer")
        if self.trainer not in ("ray", "local"):
            raise BadInput(f"unknown trainer {self.trainer!r}; choose ray or local")
        if self.num_classes < 2:
            raise BadInput("--num-classes must be at least 2")
        if self.min_steps < 0:
            raise BadInput(f"--min-steps {self.min_steps}: must be 0 or more")
        if self.initial_draw not in ("random", "typical"):
            raise BadInput(f"--initial-draw {self.initial_draw!r}: choose random or typical")


# ---- where things live ---------------------------------------------------------------------

def state_uri(root: str) -> str:
    return storage.join(root, "campaign.json")


def cycle_uri(root: str, cycle: int, *parts: str) -> str:
    return storage.join(root, "cycles", f"{cycle:03d}", *parts)


def initial_selection_uri(root: str) -> str:
    """The initial draw waiting for a person's labels (no --oracle)."""
    return storage.join(root, "initial", "selection.parquet")


def labels_uri(root: str, cycle: int) -> str:
    return storage.join(root, "labeled", f"cycle-{cycle:03d}.parquet")


def load_state(root: str) -> dict:
    if not storage.exists(state_uri(root)):
        raise BadInput(f"no campaign at {root} (run 'tidal-ray campaign init' first)")
    return storage.read_json(state_uri(root))


def save_state(root: str, state: dict) -> None:
    state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    storage.write_json(state_uri(root), state)


def config_of(state: dict) -> CampaignConfig:
    config = dict(state["config"])
    config["actors"] = tuple(config["actors"])
    if config.get("feature_layers"):
        config["feature_layers"] = tuple(config["feature_layers"])
    return CampaignConfig(**config)


def input_shape_of(config: CampaignConfig) -> tuple[int, ...]:
    """The campaign's input, settled from its pool and recipe the same way every cycle."""
    from tidal_ray.data.pool import describe_pool, input_shape_for

    return input_shape_for(describe_pool(config.pool), config.image_size, config.channels)


# ---- labels ---------------------------------------------------------------------------------

SKIPS_PREFIX = "skips-"


def _label_files(root: str, skips: bool) -> list[str]:
    prefix = storage.join(root, "labeled")
    files = [uri for uri, _ in storage.list_files(prefix)] if storage.exists(prefix) else []
    return [uri for uri in files if uri.endswith(".parquet") and not storage.is_hidden(uri)
            and uri.rsplit("/", 1)[-1].startswith(SKIPS_PREFIX) == skips]


def labeled_table(root: str) -> pa.Table:
    """Every label that has arrived, in arrival order."""
    tables = [storage.read_parquet(uri).select(["id", "label"]) for uri in _label_files(root, skips=False)]
    if not tables:
        return pa.table({"id": pa.array([], pa.int64()), "label": pa.array([], pa.int64())})
    return pa.concat_tables(tables, promote_options="permissive")


def skipped_table(root: str) -> pa.Table:
    """Every selected id that came back as a skip (nobody could label it), with the reason."""
    tables = [storage.read_parquet(uri).select(["id", "reason"]) for uri in _label_files(root, skips=True)]
    if not tables:
        return pa.table({"id": pa.array([], pa.int64()), "reason": pa.array([], pa.string())})
    return pa.concat_tables(tables, promote_options="permissive")


def cycle_label_progress(root: str, cycle: int, selection_uri: str | None = None) -> dict:
    """How far the cycle's selection (or the one in ``selection_uri``) is: ``selected``,
    ``labeled``, ``skipped``, and ``waiting``, the ids with neither, in selection order."""
    selection_uri = selection_uri or cycle_uri(root, cycle, "selection.parquet")
    selection = storage.read_parquet(selection_uri).column("id").to_pylist()
    labeled = set(labeled_table(root).column("id").to_pylist())
    skipped = set(skipped_table(root).column("id").to_pylist()) - labeled
    return {"selected": len(selection), "labeled": len(labeled.intersection(selection)),
            "skipped": len(skipped.intersection(selection)),
            "waiting": [i for i in selection if i not in labeled and i not in skipped]}


def progress_line(progress: dict) -> str:
    waiting = progress["waiting"]
    first = ", ".join(map(str, waiting[:5])) + (", ..." if len(waiting) > 5 else "")
    return (f"{progress['labeled']} of {progress['selected']} selected samples labeled, {progress['skipped']} skipped; "
            f"waiting for {len(waiting)}" + (f": {first}" if waiting else ""))


def skips_uri(root: str, cycle: int, delivery: int) -> str:
    """Ids of a cycle's selection that came back unlabelable, one file per delivery, never rewritten."""
    return storage.join(root, "labeled", f"{SKIPS_PREFIX}cycle-{cycle:03d}-delivery-{delivery:03d}.parquet")


def delivery_uri(root: str, cycle: int, delivery: int) -> str:
    """A person's labels for a cycle, one file per delivery, never rewritten."""
    return storage.join(root, "labeled", f"cycle-{cycle:03d}-delivery-{delivery:03d}.parquet")


def selected_ids(root: str, up_to_cycle: int) -> list:
    """Ids sent out for labeling in cycles before ``up_to_cycle`` (pending or labeled)."""
    ids = []
    for c in range(up_to_cycle):
        uri = cycle_uri(root, c, "selection.parquet")
        if storage.exists(uri):
            ids.extend(storage.read_parquet(uri).column("id").to_pylist())
    return ids


def positions_of(table: pa.Table) -> pa.Table | None:
    """``id`` and where the row lives, from a selection or the initial labels (None
    when it does not say: made before positions were recorded)."""
    from tidal_ray.data.lookup import POSITION_COLUMNS

    if not all(c in table.column_names for c in POSITION_COLUMNS):
        return None
    table = table.select(["id", *POSITION_COLUMNS])
    return table.filter(table.column("row").is_valid())


def label_positions(root: str, cycle: int) -> pa.Table | None:
    """Where the labeled rows live: the initial labels' positions (looked up once at
    init) and every earlier cycle's selection (later labels are of selected ids)."""
    tables = [positions_of(storage.read_parquet(uri)) for uri in
              [labels_uri(root, 0)] + [cycle_uri(root, c, "selection.parquet") for c in range(cycle)]
              if storage.exists(uri)]
    tables = [t for t in tables if t is not None]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def class_names_from(text: str | None) -> list[str] | None:
    """``--class-names``: comma-separated, or a file (local or s3://) with one name per line."""
    if not text:
        return None
    if text.startswith("s3://") or os.path.isfile(text):
        names = [line.strip() for line in storage.read_bytes(text).decode().splitlines()]
    else:
        names = [n.strip() for n in text.split(",")]
    names = [n for n in names if n]
    if len(set(names)) != len(names):
        raise BadInput(f"--class-names: names repeat ({text})")
    return names
