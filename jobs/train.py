"""Entrypoint for `ray job submit -- python jobs/train.py --labeled URI --out URI ...`.

Takes the same arguments as `tidal-ray train`. Inside a submitted job RAY_ADDRESS is set,
so the plain `ray.init()` in `train_on_ray` joins that cluster; run by hand without it,
it starts a local Ray."""
import sys

from tidal_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
