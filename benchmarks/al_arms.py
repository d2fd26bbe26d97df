"""Fashion-MNIST arms (issue 19): one (seed, arm) run per call, each written to its own JSON,
and the merge of those files into ``<out>/fashion-mnist-<regime>.json``.

An arm is ``<strategy>[-<mode>][-quota][-subset10k][-warm][-typical]``:
- mode ``topk`` (default), ``power[BETA]`` (Gumbel-top-k on s ** BETA, ``method.batch.power_keys``),
  ``cluster[K]`` (Cluster-Margin: round-robin over K k-means clusters of the model's
  embedding among the top M = 10 k candidates, ``method.batch.kmeans/round_robin``);
- ``-quota``: ``--per-class-quota`` (``topk`` and ``power``): at most ceil(k / C) rows per
  predicted class, the top k of their union, filled to k by the best rows left when a class
  falls short (``method.topk.StreamingTopK``);
- ``-subset10k``: the strategy scores a fresh random 10,000-row subset each cycle;
- ``-warm``: each cycle's training starts from the previous cycle's checkpoint (backbone and
  TD module; fresh optimizer, empty TD table);
- ``-typical``: the initial set is TypiClust's (``method.batch.typical_rows``) over the
  label-free embedding of a hashed sample of the pool (``method.embedding``), not random.

The embedding for ``cluster`` is the model's own: the pooled (global-average) output of the
backbone's last stage, L2-normalised. Centroids are fitted each cycle on a hashed sample of
the unlabeled pool (``CLUSTER_SAMPLE`` rows).
"""
from __future__ import annotations

import glob
import json
import os
import re
import tempfile
import time

import numpy as np

import al_quality as aq

DEFAULT_BETA = 4.0        # provisional; see benchmarks/README (chosen on a pool split, never the test split)
MAX_CLUSTERS = 1000
CANDIDATES_PER_K = 10     # M = 10 k
CLUSTER_SAMPLE = 20_000   # rows of the unlabeled pool the centroids are fitted on
TYPICAL_SAMPLE = 20_000   # rows of the pool the typical initial set is drawn from
STRATEGY_NAMES = ("tidal-entropy", "tidal-margin", "entropy", "margin", "least-confidence", "random")
_MODE = re.compile(r"^(topk|power|cluster)(\d+(?:\.\d+)?)?$")


def parse_arm(name: str) -> dict:
    """``margin-power2-subset10k-warm`` -> its parts; ValueError naming the arm otherwise."""
    arm = {"name": name, "subset": False, "warm": False, "typical": False, "quota": False, "mode": "topk",
           "param": None}
    rest = name
    for flag, suffix in (("typical", "-typical"), ("warm", "-warm"), ("subset", aq.SUBSET_SUFFIX), ("quota", "-quota")):
        if rest.endswith(suffix):
            arm[flag], rest = True, rest[: -len(suffix)]
    head, _, last = rest.rpartition("-")
    match = _MODE.match(last)
    if match and head:
        arm["mode"], rest = match.group(1), head
        arm["param"] = float(match.group(2)) if match.group(2) else None
    if rest not in STRATEGY_NAMES or (arm["mode"] == "topk" and arm["param"] is not None) or \
            (arm["quota"] and (arm["mode"] == "cluster" or rest == "random")):
        raise ValueError(f"arm {name!r}: expected <strategy>[-topk|-power[BETA]|-cluster[K]][-quota][-subset10k]"
                         f"[-warm][-typical] with a strategy of {', '.join(STRATEGY_NAMES)} (-quota: not with "
                         f"cluster or random)")
    arm["strategy"] = rest
    return arm


# ---- selection ---------------------------------------------------------------------------------


def embed(net, pixels: np.ndarray, chunk: int) -> np.ndarray:
    """The model's embedding of rows: the backbone's pooled last-stage features, L2-normalised."""
    import torch

    from tidal_ray.method.batch import normalize_rows
    from tidal_ray.models import prepare_input

    device = next(net.parameters()).device
    net.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(pixels), chunk):
            x = prepare_input(torch.from_numpy(pixels[s:s + chunk]).to(device))
            out.append(net.backbone.forward_features(net.input_norm(x))[0].float().cpu().numpy())
    return normalize_rows(np.concatenate(out))


def hashed_sample(ids: np.ndarray, size: int, salt: int) -> np.ndarray:
    """Indices of the ``size`` rows with the smallest id hashes: a seeded, order-free sample."""
    from tidal_ray.method.hashing import hash64

    if len(ids) <= size:
        return np.arange(len(ids))
    return np.sort(np.argsort(hash64(np.asarray(ids), salt), kind="stable")[:size])


def select(arm: dict, scored: dict, column: str, k: int, seed: int, cycle: int, net=None, data=None,
           unlabeled=None, chunk: int = 128, num_classes: int | None = None) -> np.ndarray:
    """The ids an arm picks this cycle from its scored rows (``num_classes``: for ``-quota``)."""
    from tidal_ray.method.batch import kmeans, nearest_centroid, power_keys, round_robin
    from tidal_ray.method.topk import StreamingTopK, rank_order

    ids, scores = scored["id"], np.asarray(scored[column], dtype=np.float64)
    if arm["mode"] == "power":
        beta = arm["param"] if arm["param"] is not None else DEFAULT_BETA
        scores = power_keys(column, scores, ids, beta, seed, cycle)
    if arm["quota"]:
        best = StreamingTopK(k, per_class_quota=True, num_classes=num_classes)
        best.add(ids, scores, scored["predicted_class"])
        return best.result()[0]
    top = rank_order(ids, scores)
    if arm["mode"] != "cluster":
        return ids[top[:k]]
    clusters = int(arm["param"]) if arm["param"] is not None else min(k, MAX_CLUSTERS)
    candidates = top[:min(CANDIDATES_PER_K * k, len(top))]
    sample = unlabeled[hashed_sample(data["ids"][unlabeled], CLUSTER_SAMPLE, seed * 1000 + cycle)]
    centroids = kmeans(embed(net, data["pixels"][sample], chunk), min(clusters, len(sample)), seed * 1000 + cycle)
    # ids are row indices here (Fashion-MNIST ids = positions), so pixels are read by id.
    assign = nearest_centroid(embed(net, data["pixels"][ids[candidates]], chunk), centroids)
    return ids[candidates][round_robin(ids[candidates], scores[candidates], assign, k)]


def typical_initial(data: dict, budget: int, seed: int) -> list[int]:
    """TypiClust's initial set over the label-free embedding of a hashed sample of the pool."""
    from tidal_ray.method.batch import typical_rows
    from tidal_ray.method.embedding import label_free_embedding

    pool = data["pool"][hashed_sample(data["ids"][data["pool"]], TYPICAL_SAMPLE, seed ^ 0x7A1)]
    picks = typical_rows(label_free_embedding(data["pixels"][pool], seed), data["ids"][pool], budget, seed)
    return sorted(pool[picks].tolist())


# ---- one run -----------------------------------------------------------------------------------


def restrict(data: dict, spec: dict) -> dict:
    """The spec's cuts of the data: ``validation`` = N pool rows replace the test split (a pool
    split, the same for every seed; the test split is then never read), ``pool_rows`` = a seeded
    part of the pool, ``test_rows`` = the first test rows (smoke runs)."""
    if spec.get("validation"):
        held = np.sort(np.random.default_rng(1234).choice(data["pool"], spec["validation"], replace=False))
        data["pool"], data["test"] = np.setdiff1d(data["pool"], held), held
    if spec.get("pool_rows") and spec["pool_rows"] < len(data["pool"]):
        data["pool"] = np.sort(np.random.default_rng(4321).choice(data["pool"], spec["pool_rows"], replace=False))
    if spec.get("test_rows"):
        data["test"] = data["test"][:spec["test_rows"]]
    return data


def run_arm(regime: str, arm_name: str, seed: int, spec: dict, recipe: dict, data_dir: str | None = None,
            device: str = "cpu", log=print) -> dict:
    """One (seed, arm) run of the protocol: its record (accuracy per cycle and what was picked)."""
    import torch

    from tidal_ray.data.datasets import initial_labels
    from tidal_ray.score.scorer import BatchScorer
    from tidal_ray.train.checkpoint import save_checkpoint

    torch.set_num_threads(1)
    arm = parse_arm(arm_name)
    chunk = 4096 if device.startswith("cuda") else aq.SCORE_CHUNK
    data = restrict(aq.load_data("fashion-mnist", seed, spec["imbalance_factor"], data_dir), spec)
    labeled = (typical_initial(data, spec["initial"], seed) if arm["typical"]
               else list(initial_labels(data["pool"], spec["initial"], seed)))
    record = aq._new_record(regime, arm_name, seed, len(data["pool"]))
    record["epochs"] = []
    column = arm["strategy"]
    previous = None
    with tempfile.TemporaryDirectory() as tmp:
        for cycle in range(spec["cycles"] + 1):
            started = time.perf_counter()
            net, session, epochs = aq.train(data, np.array(labeled), recipe, seed * 1000 + cycle, device,
                                            init_checkpoint=previous if arm["warm"] else None)
            previous = save_checkpoint(session.last_state, os.path.join(tmp, f"c{cycle}"))
            accuracy = aq.test_accuracy(net, data)
            log(f"  {regime} seed {seed} {arm_name} cycle {cycle}: {len(labeled)} labels, {epochs} epochs, "
                f"accuracy {accuracy:.4f}, {time.perf_counter() - started:.0f} s", flush=True)
            record["labeled"].append(len(labeled))
            record["accuracy"].append(accuracy)
            record["td_kl"].append(session.history[-1]["kl"])
            record["epochs"].append(epochs)
            if cycle == spec["cycles"]:
                break
            started = time.perf_counter()
            unlabeled = np.setdiff1d(data["pool"], labeled)
            rows = aq.candidate_rows(column + aq.SUBSET_SUFFIX if arm["subset"] else column, unlabeled,
                                     spec.get("subset", len(unlabeled)), seed, cycle)
            if column == "random":
                scored = aq.random_selection_scores(data, rows, seed)
            else:
                scorer = BatchScorer(previous, seed=seed, device=device)
                scored = aq.score(scorer, data, rows, aq.MODEL_COLUMNS, chunk)
            chosen = select(arm, scored, column, spec["k"], seed, cycle, net, data, unlabeled, chunk, data["classes"])
            record["selected_class_counts"].append(np.bincount(data["labels"][chosen], minlength=data["classes"]).tolist())
            record["selected_score_mean"].append(float(scored[column][np.isin(scored["id"], chosen)].mean()))
            record["scored_rows"].append(len(rows))
            record["scoring_seconds"].append(time.perf_counter() - started)
            labeled.extend(chosen.tolist())
    assert len(set(labeled)) == len(labeled), "a sample was selected twice"
    return record


def run_path(runs_dir: str, regime: str, seed: int, arm: str) -> str:
    return os.path.join(runs_dir, f"fashion-mnist-{regime}", f"seed{seed}-{arm}.json")


def run_environment() -> dict:
    """What a run's floats depend on besides its seed. Two runs of one (seed, arm) on two machines
    differed by up to 0.006 AUC (benchmarks/README); this says which runs can be paired."""
    import platform

    import torch

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_one(regime: str, arm: str, seed: int, spec: dict, recipe: dict, data_dir: str | None, device: str,
            runs_dir: str) -> str:
    """Runs (seed, arm) unless its JSON is already there; writes it atomically."""
    path = run_path(runs_dir, regime, seed, arm)
    if os.path.exists(path):
        return path
    started = time.perf_counter()
    record = run_arm(regime, arm, seed, spec, recipe, data_dir, device)
    record["environment"] = run_environment()  # after the run: it sets torch's threads
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"dataset": "fashion-mnist", "regime": regime, "arm": arm, "seed": seed, "spec": spec,
                   "recipe": recipe, "device": device, "seconds": time.perf_counter() - started,
                   "record": record}, f)
    os.replace(path + ".tmp", path)
    print(f"{regime} seed {seed} {arm}: written {path} ({time.perf_counter() - started:.0f} s)", flush=True)
    return path


def run_many(regime: str, arms: list[str], seeds: list[int], spec: dict, recipe: dict, data_dir: str | None,
             device: str, runs_dir: str, jobs: int = 1) -> list[str]:
    """Every (seed, arm), ``jobs`` at a time in separate processes (spawned: CUDA-safe)."""
    for arm in arms:
        parse_arm(arm)
    tasks = [(regime, arm, seed, spec, recipe, data_dir, device, runs_dir) for seed in seeds for arm in arms]
    if jobs <= 1:
        return [run_one(*t) for t in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [f.result() for f in [pool.submit(run_one, *t) for t in tasks]]


# ---- merge -------------------------------------------------------------------------------------


def merge_runs(runs_dir: str, out_dir: str, regime: str, plot: bool = True) -> dict | None:
    """Folds ``<runs_dir>/fashion-mnist-<regime>/*.json`` into ``<out_dir>/fashion-mnist-<regime>.json``.
    Runs of the file made with the same spec and recipe stay (a redone (seed, arm) is replaced);
    runs of another recipe move under ``old_recipe`` (they no longer pair with the new ones)."""
    files = sorted(glob.glob(os.path.join(runs_dir, f"fashion-mnist-{regime}", "*.json")))
    runs = [json.load(open(p)) for p in files]
    if not runs:
        return None
    spec, recipe = runs[0]["spec"], runs[0]["recipe"]
    mixed = [r["arm"] for r in runs if [r["spec"], r["recipe"]] != [spec, recipe]]
    if mixed:
        raise ValueError(f"{runs_dir}: runs of {regime} made with another spec or recipe: {', '.join(mixed)}")
    records = [r["record"] for r in runs]
    seconds = sum(r["seconds"] for r in runs)
    path = os.path.join(out_dir, f"fashion-mnist-{regime}.json")
    extra = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if [old["spec"], old["recipe"]] == json.loads(json.dumps([spec, recipe])):
            have = {(r["seed"], r["strategy"]) for r in records}
            records += [r for r in old["runs"] if (r["seed"], r["strategy"]) not in have]
            seconds += float(old["seconds"])
            extra = {k: old[k] for k in ("old_recipe",) if k in old}
        else:
            extra["old_recipe"] = old.get("old_recipe") or {
                "note": "made with an earlier recipe; these arms do not pair with the summary's",
                "recipe": old["recipe"], "spec": old["spec"], "summary": old["summary"], "runs": old["runs"]}
    arms = list(dict.fromkeys(r["strategy"] for r in records))
    result = aq.write_outputs("fashion-mnist", regime, spec, recipe, records, arms, seconds, out_dir,
                              extra=extra, plot=plot)
    print(f"fashion-mnist {regime}: {len(records)} runs, arms {', '.join(arms)} -> {path}", flush=True)
    return result


# ---- the arms of issue 19, and fitting the reference recipe into a time budget --------------------

# Warm start is campaign init's default, so every regime also runs top-k, power and the
# 10k subset warm (the whole pool against the subset under the default).
_EVERY = ["random", "margin", "tidal-margin", "margin-subset10k", "margin-power", "margin-cluster",
          "tidal-margin-power", "tidal-margin-cluster", "margin-warm", "margin-power-warm",
          "margin-subset10k-warm"]
ARMS = {"large": _EVERY + ["margin-cluster-warm"], "balanced": _EVERY + ["tidal-margin-warm", "margin-cluster-warm"],
        "imbalanced": _EVERY, "cold": _EVERY + ["margin-typical", "margin-warm-typical"],
        "reference": ["tidal-entropy-subset10k-warm", "margin-subset10k-warm"]}


def batches_over_cycles(spec: dict, batch_size: int, cycles: int) -> int:
    return sum(-(-(spec["initial"] + c * spec["k"]) // batch_size) for c in range(cycles + 1))


def fit_budget(spec: dict, recipe: dict, data_dir: str | None, device: str, seconds: float,
               min_epochs: int = 10, share: float = 0.8) -> tuple[dict, dict]:
    """Times the recipe's training (epochs 2 and 3 on the initial set; the first warms up) and
    cuts its epochs, then its cycles, so one run's training fits ``share`` of ``seconds``.
    Returns the (spec, recipe) to run and prints what was cut."""
    from tidal_ray.data.datasets import initial_labels

    data = restrict(aq.load_data("fashion-mnist", 0, None, data_dir), spec)
    rows = np.array(list(initial_labels(data["pool"], spec["initial"], 0)))
    _, session, _ = aq.train(data, rows, dict(recipe, epochs=3, min_steps=0, lr_drop_at=None), 0, device)
    epoch_s = min(h["epoch_seconds"] for h in session.history[1:])
    per_batch = epoch_s / -(-len(rows) // recipe["batch_size"])
    cycles = spec["cycles"]
    need = per_batch * batches_over_cycles(spec, recipe["batch_size"], cycles) * recipe["epochs"]

    def epochs_within(c: int) -> int:
        return int(share * seconds / (per_batch * batches_over_cycles(spec, recipe["batch_size"], c)))

    while cycles > 1 and epochs_within(cycles) < min_epochs:
        cycles -= 1
    epochs = max(1, min(recipe["epochs"], epochs_within(cycles)))
    print(f"reference recipe on {device}: one epoch at {len(rows)} labels {epoch_s:.2f} s ({per_batch * 1000:.1f} ms "
          f"per batch of {recipe['batch_size']}); {recipe['epochs']} epochs x {spec['cycles']} cycles would train "
          f"{need:.0f} s; cut to {epochs} epochs (x0.1 at epoch {max(1, round(recipe.get('lr_drop_at', 0.8) * epochs))})"
          f" and {cycles} cycles to fit {share:.0%} of {seconds:.0f} s", flush=True)
    return dict(spec, cycles=cycles), dict(recipe, epochs=epochs)
