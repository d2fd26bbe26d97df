"""``tidal-ray demo``: train on 20 labels of real digits, score the rest, print the top-k."""
from __future__ import annotations

import os
import time

import numpy as np

from .checkpoint import save_checkpoint
from .datasets import DIGITS_CLASSES, DIGITS_SHAPE, initial_labels, load_digits
from .score import BatchScorer
from .topk import StreamingTopK
from .train import TrainConfig, train_in_process


def run_demo(workdir: str, labels: int = 20, k: int = 10, strategy: str = "tidal-entropy", seed: int = 0) -> dict:
    ids, pixels, y = load_digits()
    labeled = initial_labels(np.arange(len(ids)), labels, seed)
    topk = StreamingTopK(k, exclude=ids[labeled])  # checks k before any training
    print(f"digits: {len(ids)} real 8x8 images; training on {len(labeled)} labels (seed {seed})")
    config = TrainConfig(num_classes=DIGITS_CLASSES, input_shape=DIGITS_SHAPE, backbone="small_cnn",
                         epochs=60, batch_size=32, seed=seed)
    started = time.perf_counter()
    _, _, session = train_in_process(config, ids[labeled], pixels[labeled], y[labeled])
    last = session.history[-1]
    print(f"trained {config.epochs} epochs in {time.perf_counter() - started:.1f}s: "
          f"loss {last['loss']:.3f} (CE {last['ce']:.3f}, KL {last['kl']:.4f}), train acc {last['train_accuracy']:.2f}")
    checkpoint = save_checkpoint(session.last_state, os.path.join(workdir, "checkpoint"))

    scorer = BatchScorer(checkpoint, seed=seed)
    unlabeled_acc = []
    for start in range(0, len(ids), 256):
        rows = slice(start, start + 256)
        out = scorer({"id": ids[rows], "x": pixels[rows]})
        topk.add(out["id"], out[strategy], out["predicted_class"])
        unlabeled_acc.append(out["predicted_class"] == y[rows])
    sel_ids, sel_scores, sel_pred = topk.result()
    print(f"scored {topk.rows_in} rows ({topk.rows_excluded} already labeled, excluded); "
          f"model accuracy on the pool {np.concatenate(unlabeled_acc).mean():.3f}")
    print(f"\ntop-{k} by {strategy} (label these next):")
    print(f"{'rank':>4}  {'id':>5}  {'score':>8}  {'predicted':>9}  {'true label':>10}")
    for rank, (i, s, p) in enumerate(zip(sel_ids, sel_scores, sel_pred), 1):
        print(f"{rank:>4}  {i:>5}  {s:>8.4f}  {p:>9}  {y[i]:>10}")
    print(f"\ncheckpoint: {checkpoint}")
    return {"ids": sel_ids, "scores": sel_scores, "predicted": sel_pred}
