"""Print a sweep's jobs best first and write SWEEP_DIR/summary.csv.

Usage: `python scripts/summarize_sweep.py outputs/train/multiruns/2026-01-01_12-00-00`
"""

import argparse
from pathlib import Path

from flowerdiff.tasks.sweep import load_jobs, print_summary, write_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun directory (hydra.sweep.dir)")
    args = parser.parse_args()
    if not load_jobs(args.sweep_dir):
        parser.exit(
            1,
            f"No job results (*/metrics.json) under {args.sweep_dir}. Pass the directory a "
            "multirun wrote (hydra.sweep.dir, e.g. outputs/train/multiruns/<date_time>).\n",
        )
    print_summary(args.sweep_dir)
    print(f"wrote {write_summary(args.sweep_dir)}")


if __name__ == "__main__":
    main()
