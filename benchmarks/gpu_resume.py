"""Resume on a GPU from a mid-run checkpoint (issue 20, item 1), standalone: the in-process
training loop (train.loop.run_training with a LocalSession), no Ray, no boto3, so it runs
where only torch, numpy, pyarrow and Pillow are installed:

    PYTHONPATH=. python benchmarks/gpu_resume.py [--device cuda] [--backbone small_cnn]

Three runs of the same seeded config on synthetic 3x32x32 images: one uninterrupted; one
killed right after its checkpoint at --resume-at; one resumed on the device from that
checkpoint (saved and loaded with weights_only=True, map_location="cpu", as a checkpoint
file is). By default torch runs deterministic algorithms only, and PASS means the resumed
epochs' losses equal the uninterrupted run's to --rtol (0: bitwise). With --nondeterministic
(cuDNN's and cuBLAS's fastest kernels, torch's default) runs differ from each other: a
second uninterrupted run is made and both differences are printed, and PASS means only
that the resumed run trained its epochs on the device (the differences compound from the
killed run's first epochs on, so no tolerance holds them). Measured on an H200 (torch
2.11): deterministic, bitwise equal for small_cnn and resnet18; before the fix, the resume
failed at its first step (RuntimeError: tensors on cuda:0 and cpu). Prints the figures
and one line PASS/FAIL; exit 0 on PASS, 1 on FAIL.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: deterministic cuBLAS

import numpy as np
import torch

from tidal_ray.train.config import TrainConfig
from tidal_ray.train.loop import LocalSession, run_training


class Killed(Exception):
    pass


def synthetic(rows: int, classes: int, seed: int):
    """Images whose class shows in a brightness pattern, so the loss falls epoch by epoch."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    base = rng.integers(0, 256, (classes, 3, 32, 32))
    noise = rng.integers(-40, 41, (rows, 3, 32, 32))
    pixels = np.clip(base[labels] + noise, 0, 255).astype(np.uint8)
    return np.arange(rows, dtype=np.int64), pixels, labels.astype(np.int64)


def run(config, data, device, resume=None, kill_at=None):
    def on_epoch(metrics):
        if kill_at is not None and metrics["epoch"] == kill_at:
            raise Killed

    session = LocalSession(*data, config.batch_size, config.seed, device, on_epoch, resume)
    started = time.perf_counter()
    net = None
    try:
        net, _ = run_training(config, session)
    except Killed:
        pass
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return net, session, time.perf_counter() - started


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--resume-at", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--rtol", type=float, default=0.0)
    p.add_argument("--nondeterministic", action="store_true", help="allow nondeterministic kernels (the default in torch)")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("FAIL: torch has no CUDA here")
        return 1
    if not args.nondeterministic:
        torch.use_deterministic_algorithms(True)

    config = TrainConfig(num_classes=10, input_shape=(3, 32, 32), backbone=args.backbone, epochs=args.epochs,
                         batch_size=args.batch_size, seed=args.seed, checkpoint_every=args.resume_at, augment=True)
    data = synthetic(args.rows, config.num_classes, args.seed)
    whole, whole_session, whole_s = run(config, data, args.device)
    repeat = run(config, data, args.device)[1] if args.nondeterministic else whole_session
    _, killed, killed_s = run(config, data, args.device, kill_at=args.resume_at)
    buf = io.BytesIO()
    torch.save(killed.last_state, buf)
    state = torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)
    error = None
    try:
        resumed, resumed_session, resumed_s = run(config, data, args.device, resume=state)
    except Exception as e:  # the pre-fix failure: a device mismatch at the first step
        resumed, resumed_session, resumed_s, error = None, None, 0.0, f"{type(e).__name__}: {e}".splitlines()[0]

    figures = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "torch": torch.__version__, "backbone": args.backbone, "rows": args.rows, "epochs": args.epochs,
               "resume_at": args.resume_at, "deterministic": not args.nondeterministic,
               "uninterrupted_loss": [m["loss"] for m in whole_session.history],
               "killed_loss": [m["loss"] for m in killed.history],
               "seconds": {"uninterrupted": round(whole_s, 2), "killed": round(killed_s, 2),
                           "resumed": round(resumed_s, 2)}, "resume_error": error}
    ok = error is None
    if ok:
        mine = np.array([m["loss"] for m in resumed_session.history])
        theirs = np.array(figures["uninterrupted_loss"][args.resume_at:])
        again = np.array([m["loss"] for m in repeat.history][args.resume_at:])
        weights = max(float((whole.state_dict()[k].double() - v.double()).abs().max())
                      for k, v in resumed.state_dict().items() if v.is_floating_point())
        figures.update({"resumed_loss": mine.tolist(),
                        "resumed_epochs": [m["epoch"] for m in resumed_session.history],
                        "loss_max_rel_diff": float(np.max(np.abs(mine - theirs) / np.abs(theirs))),
                        "losses_bitwise_equal": bool(np.array_equal(mine, theirs)),
                        "repeat_loss_max_rel_diff": float(np.max(np.abs(again - theirs) / np.abs(theirs))),
                        "weights_max_abs_diff": weights})
        ok = (figures["resumed_epochs"] == list(range(args.resume_at + 1, args.epochs + 1))
              and bool(np.isfinite(mine).all())
              and (args.nondeterministic or figures["loss_max_rel_diff"] <= args.rtol))
    print(json.dumps(figures, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)
    print(("PASS" if ok else "FAIL") + f": resume on {args.device} from the epoch-{args.resume_at} checkpoint"
          + (f" ({error})" if error else f", loss max relative difference {figures['loss_max_rel_diff']:.2e}"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
