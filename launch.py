"""Run an experiment spec or a sweep: locally, through submitit's debug executor, or on SLURM; `status DIR` reports.

Examples: `python launch.py experiments/smoke_synthetic.yaml --cluster local`,
`python launch.py --sweep experiments/sweeps/smoke_lr.yaml --dry-run`, `python launch.py status runs/smoke_lr`.
"""

import sys

from conddetr.launch_cli import main

if __name__ == "__main__":
    sys.exit(main())
