"""Entrypoint for `ray job submit -- python jobs/score.py --checkpoint URI --pool URI --k K --out URI ...`.

Takes the same arguments as `tidal-ray score`. Inside a submitted job RAY_ADDRESS is set,
so scoring joins that cluster; run by hand without it, it starts a local Ray."""
import sys

from tidal_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
