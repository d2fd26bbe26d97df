"""Selection quality on real data: the AL protocol of DESIGN.md §7 on scikit-learn digits.

Every (seed, strategy) run retrains from scratch each cycle with the same training loop
(`train_in_process` -> `run_training`) and scores the unlabeled pool with the same
`BatchScorer` and `StreamingTopK` as the Ray path. The test split is only ever used to
report accuracy, never to choose anything.

    python benchmarks/al_quality.py --regime balanced            # 100 initial, +50, 10 cycles
    python benchmarks/al_quality.py --regime imbalanced          # factor 10, 60 initial, +30
    python benchmarks/al_quality.py --regime cold                # 20 initial, +20

Writes <out>/<regime>.json (every accuracy), <regime>.md (tables) and <regime>.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

STRATEGIES = ["tidal-entropy", "tidal-margin", "entropy", "margin", "least-confidence", "random"]
REGIMES = {
    "balanced": {"initial": 100, "k": 50, "imbalance_factor": None},
    "imbalanced": {"initial": 60, "k": 30, "imbalance_factor": 10.0},
    "cold": {"initial": 20, "k": 20, "imbalance_factor": None},
}
# The recipe, fixed before any run and never tuned on the test split: the small CNN
# (three conv stages, suited to 8x8 inputs), Adam 1e-3 with cosine decay, 60 epochs,
# batch 64, lambda = 1 as in the paper.
RECIPE = {"backbone": "small_cnn", "epochs": 60, "batch_size": 64, "lr": 1e-3, "lam": 1.0}


def run_one(regime: str, strategy: str, seed: int, cycles: int, recipe: dict) -> dict:
    import torch

    from tidal_ray.checkpoint import save_checkpoint
    from tidal_ray.datasets import (DIGITS_CLASSES, DIGITS_SHAPE, imbalance, initial_labels, load_digits,
                                    split_pool_test)
    from tidal_ray.scorer import BatchScorer
    from tidal_ray.topk import StreamingTopK
    from tidal_ray.models import prepare_input
    from tidal_ray.train import TrainConfig, train_in_process

    torch.set_num_threads(1)
    spec = REGIMES[regime]
    ids, pixels, labels = load_digits()
    pool, test = split_pool_test(labels, test_size=400, seed=seed)
    if spec["imbalance_factor"]:
        pool = imbalance(pool, labels, spec["imbalance_factor"])
    labeled = list(initial_labels(pool, spec["initial"], seed))
    record = {"regime": regime, "strategy": strategy, "seed": seed, "pool_size": len(pool),
              "labeled": [], "accuracy": [], "td_kl": [], "selected_class_counts": [], "selected_score_mean": []}
    with tempfile.TemporaryDirectory() as tmp:
        for cycle in range(cycles + 1):
            config = TrainConfig(num_classes=DIGITS_CLASSES, input_shape=DIGITS_SHAPE, seed=seed * 1000 + cycle,
                                 backbone=recipe["backbone"], epochs=recipe["epochs"],
                                 batch_size=recipe["batch_size"], lr=recipe["lr"], lam=recipe["lam"])
            rows = np.array(labeled)
            net, _, session = train_in_process(config, ids[rows], pixels[rows], labels[rows])
            with torch.no_grad():
                logits, _ = net.eval()(prepare_input(torch.from_numpy(pixels[test])))
            record["labeled"].append(len(labeled))
            record["accuracy"].append(float((logits.argmax(1).numpy() == labels[test]).mean()))
            record["td_kl"].append(session.history[-1]["kl"])
            if cycle == cycles:
                break
            scorer = BatchScorer(save_checkpoint(session.last_state, os.path.join(tmp, f"c{cycle}")), seed=seed)
            topk = StreamingTopK(spec["k"])
            unlabeled = np.setdiff1d(pool, rows)
            for start in range(0, len(unlabeled), 512):
                chunk = unlabeled[start:start + 512]
                out = scorer({"id": ids[chunk], "x": pixels[chunk]})
                topk.add(out["id"], out[strategy], out["predicted_class"])
            chosen, scores, _ = topk.result()
            record["selected_class_counts"].append(np.bincount(labels[chosen], minlength=DIGITS_CLASSES).tolist())
            record["selected_score_mean"].append(float(scores.mean()))
            labeled.extend(chosen.tolist())
    assert len(set(labeled)) == len(labeled), "a sample was selected twice"
    return record


def summarize(records: list[dict], strategies: list[str]) -> dict:
    table = {}
    for strategy in strategies:
        acc = np.array([r["accuracy"] for r in records if r["strategy"] == strategy])
        if not len(acc):
            continue
        auc = acc.mean(axis=1)  # area under the learning curve = mean accuracy over cycles
        table[strategy] = {
            "mean": acc.mean(0).tolist(), "std": acc.std(0).tolist(),
            "final_mean": float(acc[:, -1].mean()), "final_std": float(acc[:, -1].std()),
            "auc_mean": float(auc.mean()), "auc_std": float(auc.std()),
            "final_per_seed": acc[:, -1].tolist(), "auc_per_seed": auc.tolist(),
        }
    return table


def markdown(regime: str, records: list[dict], summary: dict, seeds: int, seconds: float) -> str:
    labeled = records[0]["labeled"]
    lines = [f"### {regime} ({seeds} seeds, pool {records[0]['pool_size']} rows, {seconds / 60:.1f} min)", "",
             "| strategy | final accuracy | area under curve | " + " | ".join(str(n) for n in labeled) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in labeled) + " |"]
    for strategy, s in sorted(summary.items(), key=lambda kv: -kv[1]["auc_mean"]):
        cells = " | ".join(f"{m:.3f}±{d:.3f}" for m, d in zip(s["mean"], s["std"]))
        lines.append(f"| {strategy} | {s['final_mean']:.3f} ± {s['final_std']:.3f} | "
                     f"{s['auc_mean']:.3f} ± {s['auc_std']:.3f} | {cells} |")
    lines += ["", "Columns after the first three: mean ± std test accuracy at that many labels.", ""]
    return "\n".join(lines)


def plot(regime: str, records: list[dict], summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = records[0]["labeled"]
    for strategy, s in summary.items():
        mean, std = np.array(s["mean"]), np.array(s["std"])
        ax.plot(x, mean, marker="o", ms=3, label=strategy)
        ax.fill_between(x, mean - std, mean + std, alpha=0.12)
    ax.set_xlabel("labeled samples")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title(f"digits, {regime}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_regime(regime: str, seeds: int, cycles: int, strategies: list[str], out_dir: str,
               processes: int = 2, recipe: dict | None = None) -> dict:
    recipe = recipe or RECIPE
    started = time.perf_counter()
    jobs = [(regime, s, seed, cycles, recipe) for seed in range(seeds) for s in strategies]
    with ProcessPoolExecutor(max_workers=processes) as pool:
        records = list(pool.map(run_one, *zip(*jobs)))
    seconds = time.perf_counter() - started
    summary = summarize(records, strategies)
    os.makedirs(out_dir, exist_ok=True)
    result = {"regime": regime, "spec": REGIMES[regime], "recipe": recipe, "seeds": seeds, "cycles": cycles,
              "seconds": seconds, "machine": f"{os.cpu_count()} CPUs", "summary": summary, "runs": records}
    with open(os.path.join(out_dir, f"{regime}.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(regime, records, summary, seeds, seconds)
    with open(os.path.join(out_dir, f"{regime}.md"), "w") as f:
        f.write(text)
    plot(regime, records, summary, os.path.join(out_dir, f"{regime}.png"))
    print(text)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", choices=list(REGIMES) + ["all"], default="all")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    parser.add_argument("--imbalance-factor", type=float, default=REGIMES["imbalanced"]["imbalance_factor"])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    REGIMES["imbalanced"]["imbalance_factor"] = args.imbalance_factor
    recipe = dict(RECIPE, epochs=args.epochs)
    for regime in (list(REGIMES) if args.regime == "all" else [args.regime]):
        run_regime(regime, args.seeds, args.cycles, args.strategies.split(","), args.out, args.processes, recipe)


if __name__ == "__main__":
    main()
