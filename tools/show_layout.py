"""Print the rank layout of a config for a given world size, without starting processes.

    python tools/show_layout.py --deepspeed_config configs/paper_dense_pool.json --world-size 2

Exits 2 with a one-line reason if the layout is impossible (pool that does not fit,
heads not divisible by TP, ...).
"""

from __future__ import annotations

import argparse
import sys

from megatron_fapool.config import load_run_config
from megatron_fapool.parallel import layout_from_config
from megatron_fapool.runtime import exit_on_user_error


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True)
    p.add_argument("--world-size", type=int, required=True, help="number of ranks (GPUs) to lay out")
    args = p.parse_args(argv)
    cfg = load_run_config(args.deepspeed_config)
    print(cfg.describe())
    print(layout_from_config(cfg, args.world_size).describe())
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
