#!/usr/bin/env python
"""Convert checkpoints: launch/train.py (DeepSpeed + Megatron) <-> Megatron-Core torch_dist <-> Hugging Face.

    python tools/convert_checkpoint.py inspect runs/ckpt
    python tools/convert_checkpoint.py to-dist   --load runs/ckpt --save runs/dist [--optimizer]
    python tools/convert_checkpoint.py reshard   --load runs/ckpt --deepspeed_config NEW.json --save runs/ckpt_tp1
    python tools/convert_checkpoint.py export-hf --load runs/ckpt --save runs/hf [--hf-arch auto] [--dtype bfloat16]
    python tools/convert_checkpoint.py import-hf --hf runs/hf --deepspeed_config cfg.json --save runs/ckpt_hf
    python tools/convert_checkpoint.py verify A B

Every writing command stages its output, verifies it against its source (per-tensor
table, probe logits and greedy tokens in fresh processes) and renames it into place
only then; bad input exits 2 with one line before anything is written, a failed
verification exits 1 and keeps the output as OUT.failed-<pid>. The commands and their
flags: ``--help`` of each, and docs/checkpoints.md.
"""

import sys

from megatron_fapool.convert.cli import main
from megatron_fapool.runtime import exit_on_user_error

if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
