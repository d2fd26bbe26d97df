"""Entrypoint for `ray job submit -- python jobs/campaign.py run s3://bucket/campaigns/NAME`.

Takes the same arguments as `tidal-ray campaign` (init | run | status | export | import-labels)."""
import sys

from tidal_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["campaign", *sys.argv[1:]]))
