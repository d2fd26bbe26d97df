"""``tidal-ray demo``: a whole labeling campaign on real data, on this machine.

Scikit-learn's digits are split into a pool and a test set, a campaign starts from a
few random labels, and an oracle (the pool's own labels) plays the labeling team for
5 cycles: train on Ray Train, score the pool on Ray Data, select, export, label, merge.
"""
from __future__ import annotations

import os

from tidal_ray.data import storage
from tidal_ray.data.datasets import DIGITS_CLASSES, DIGITS_SHAPE, load_digits, split_pool_test
from tidal_ray.data.make_pool import pool_table


def write_digits_split(root: str, seed: int = 0, test_size: int = 400) -> tuple[str, str]:
    """The digits as a pixels pool (2 shards) and a labeled test set under ``root``."""
    pool_uri, test_uri = storage.join(root, "pool"), storage.join(root, "test")
    ids, pixels, labels = load_digits()
    pool, test = split_pool_test(labels, test_size, seed)
    for shard, rows in enumerate((pool[: len(pool) // 2], pool[len(pool) // 2:])):
        storage.write_parquet(storage.join(pool_uri, f"part-{shard:05d}.parquet"),
                              pool_table("pixels", ids[rows], pixels[rows], labels[rows], DIGITS_SHAPE,
                                         DIGITS_CLASSES, "digits"))
    storage.write_parquet(storage.join(test_uri, "part-00000.parquet"),
                          pool_table("pixels", ids[test], pixels[test], labels[test], DIGITS_SHAPE,
                                     DIGITS_CLASSES, "digits"))
    return pool_uri, test_uri


def run_demo(workdir: str, initial: int = 50, k: int = 50, cycles: int = 5, strategy: str = "tidal-entropy",
             epochs: int = 40, seed: int = 0) -> str:
    from tidal_ray.campaign import cycle as campaign
    from tidal_ray.campaign.cycle import cycle_rows

    root = storage.join(workdir, "campaign")
    if storage.exists(campaign.state_uri(root)):
        print(f"continuing the demo campaign at {root}")
    else:
        pool_uri, test_uri = write_digits_split(workdir, seed)
        config = campaign.CampaignConfig(
            pool=pool_uri, test=test_uri, num_classes=DIGITS_CLASSES, k=k, cycles=cycles, strategy=strategy,
            backbone="small_cnn", epochs=epochs, batch_size=32, seed=seed, initial_labels=initial, oracle=True,
            initial_draw="random", trainer="ray", workers=1)
        campaign.init(root, config)
    campaign.run(root)

    print(f"\nlearning curve ({strategy}, digits, test set of 400):")
    print(f"{'cycle':>5}  {'labeled':>7}  {'test acc':>8}  {'TD KL':>7}")
    for row in cycle_rows(root):
        print(f"{row['cycle']:>5}  {row['labeled']:>7}  {row['test_accuracy']:>8.4f}  {row['td_kl']:>7.4f}")
    print(f"\nreport: {os.path.join(root, 'report', 'index.html')} (and report.md beside it)")
    print(f"plot:   {os.path.join(root, 'report', 'learning_curve.png')}")
    print(f"latest selection: {campaign.cycle_uri(root, cycles - 1, 'selection.parquet')}")
    return root
