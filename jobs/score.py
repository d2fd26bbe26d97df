"""Score a pool on a Ray cluster: ``ray job submit -- python jobs/score.py --checkpoint URI --pool URI --k K --out URI ...``.

Same arguments as ``tidal-ray score``. ``ray.init()`` joins the cluster named by
RAY_ADDRESS (set by ``ray job submit``) or starts a local Ray when there is none."""
from __future__ import annotations

import argparse
import sys

from tidal_ray.score import add_arguments, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/score.py", description="Score a whole pool and select the top k.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.in_process:
        import ray

        ray.init()
    try:
        run_cli(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jobs/score.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
