"""Command line of ``launch/train.py``: Megatron-style flags for what belongs there.

Everything about the model lives in the model YAML, everything about optimisation
(optimizer, LR schedule, ZeRO, precision, clipping, batch sizes, monitors) in the
DeepSpeed JSON; the command line names the files, the data, the length of the run
and where checkpoints go. :func:`check_run` rejects bad combinations before any
process group, tensor or file exists.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

from ..config import ConfigError
from ..data import BYTE_VOCAB_SIZE

__all__ = ["DATA_MODES", "ZERO_STAGES", "check_batch_sizes", "check_ping_pong", "check_run", "parse_args"]

DATA_MODES = ("documents", "packed")
ZERO_STAGES = (0, 1, 2)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("configuration")
    g.add_argument("--deepspeed_config", "--deepspeed-config", required=True, metavar="JSON",
                   help="DeepSpeed JSON (optimizer, scheduler, ZeRO, precision, batch sizes) with a fapool section")
    g.add_argument("--deepspeed", action="store_true",
                   help="accepted for Megatron-DeepSpeed compatibility; DeepSpeed is always used")
    g.add_argument("--yaml-cfg", default=None, metavar="YAML",
                   help="Megatron-style model YAML; replaces fapool.model_yaml of the JSON")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the launcher")

    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=int, required=True, help="optimizer steps to run in total (resumed runs count from 0)")
    g.add_argument("--seq-length", type=int, default=None,
                   help="maximum tokens per sequence (default: seq_length of the model YAML)")
    g.add_argument("--seed", type=int, default=1234, help="weights, data order and dropout")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="timeout of collectives (a pool rank waits this long for its base rank)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", required=True, metavar="PREFIX",
                   help="Megatron indexed dataset PREFIX(.bin/.idx), built by tools/preprocess_data.py")
    g.add_argument("--data-mode", choices=DATA_MODES, default="documents",
                   help="documents: one document per sample, cropped to --seq-length (lengths vary per batch);"
                        " packed: Megatron's GPTDataset, documents concatenated to exactly --seq-length")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10, help="iterations per log line")
    g.add_argument("--metrics-file", default=None, metavar="JSONL",
                   help="also write every iteration's metrics (full-precision loss, lr, tokens, pool calls) here")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, metavar="DIR", help="save checkpoints here")
    g.add_argument("--save-interval", type=int, default=None, help="save every N iterations (and at the end)")
    g.add_argument("--load", default=None, metavar="DIR",
                   help="resume from the latest complete checkpoint in DIR (start fresh if DIR has none)")
    return p


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    return build_parser(description).parse_args(argv)


def _positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise ConfigError(name, f"must be >= 1, got {value}")


def check_run(args, run_config) -> None:
    """Everything that can be checked before start-up; raises :class:`ConfigError`."""
    ds = run_config.deepspeed
    lm = run_config.model.language_model
    _positive("--train-iters", args.train_iters)
    _positive("--log-interval", args.log_interval)
    _positive("--save-interval", args.save_interval)
    _positive("--seq-length", args.seq_length)
    _positive("--distributed-timeout-minutes", args.distributed_timeout_minutes)
    seq = args.seq_length or lm.seq_length
    if seq is None:
        raise ConfigError("--seq-length", "not given and the model YAML has no seq_length")
    if seq > lm.max_position_embeddings:
        raise ConfigError("--seq-length", f"{seq} exceeds max_position_embeddings={lm.max_position_embeddings} of the model")
    if lm.vocab_size < BYTE_VOCAB_SIZE:
        raise ConfigError(
            "language_model.vocab_size",
            f"{lm.vocab_size} is smaller than the byte tokenizer's {BYTE_VOCAB_SIZE} ids: use vocab_size >= {BYTE_VOCAB_SIZE}",
            source=run_config.model_yaml_path,
        )
    if args.save_interval and not args.save:
        raise ConfigError("--save-interval", "given without --save DIR")
    for ext in (".bin", ".idx"):
        if not os.path.isfile(args.data_path + ext):
            raise ConfigError(
                "--data-path",
                f"{args.data_path}{ext} not found: build the dataset with"
                f" tools/preprocess_data.py --input <text files or dirs> --output-prefix {args.data_path}",
            )
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in ZERO_STAGES:
        raise ConfigError(
            "zero_optimization.stage",
            f"{stage} is not supported by launch/train.py (Megatron shards the model itself; ZeRO-3 would"
            f" re-partition its TP shards): use one of {list(ZERO_STAGES)}",
            source=run_config.json_path,
        )
    if run_config.pipeline_model_parallel_size != 1:
        raise ConfigError(
            "pipeline_model_parallel_size",
            f"{run_config.pipeline_model_parallel_size}: launch/train.py drives one pipeline stage per"
            " DeepSpeed engine; use tensor parallelism and the attention pool (PP = 1)",
            source=run_config.json_path,
        )
    if run_config.fapool.ma_separation.enabled and stage == 0 and run_config.precision == "bf16":
        # bf16 without ZeRO is DeepSpeed's BF16_Optimizer, whose gradient norm cannot be combined
        # with the expert ranks' (training/global_norm.py)
        raise ConfigError(
            "zero_optimization.stage",
            "0 with bf16 and MA separation: one gradient norm over attention and expert ranks needs ZeRO stage 1"
            " or 2 in bf16 (stage 0 works in fp32)",
            source=run_config.json_path,
        )
    ma = run_config.fapool.ma_separation
    if ma.enabled and ma.on_expert_loss == "degrade":
        raise ConfigError(
            "fapool.ma_separation.on_expert_loss",
            "'degrade' is for inference only: training with an expert rank lost would silently change the model;"
            " use 'fail' (resume from the last checkpoint after a loss)",
            source=run_config.json_path,
        )
    tb = ds.get("tensorboard") or {}
    if tb.get("enabled") and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "tensorboard.enabled",
            "the tensorboard package is not installed: pip install tensorboard, or use csv_monitor",
            source=run_config.json_path,
        )


def check_ping_pong(run_config, micro_batch_size: int) -> None:
    """MA separation's ping-pong cuts each micro-batch into ``micro_batches`` parts along the batch."""
    ma = run_config.fapool.ma_separation
    if ma.enabled and ma.micro_batches > micro_batch_size:
        raise ConfigError(
            "fapool.ma_separation.micro_batches",
            f"{ma.micro_batches} parts of a micro-batch of {micro_batch_size} sequences: ping-pong cuts the batch,"
            f" so use micro_batches <= train_micro_batch_size_per_gpu ({micro_batch_size})",
            source=run_config.json_path,
        )


def check_batch_sizes(ds: dict, data_parallel_size: int, json_path: str) -> tuple[int, int]:
    """(micro batch, gradient accumulation) as DeepSpeed will resolve them for ``data_parallel_size`` replicas."""
    micro = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    total = ds.get("train_batch_size")
    if micro is None and total is None:
        raise ConfigError("train_micro_batch_size_per_gpu", "give it (or train_batch_size)", source=json_path)
    if micro is None:
        gas = gas or 1
        micro, rem = divmod(total, gas * data_parallel_size)
        if rem or micro < 1:
            raise ConfigError("train_batch_size", f"{total} is not a multiple of gradient_accumulation_steps"
                              f" x data-parallel size = {gas} x {data_parallel_size}", source=json_path)
    elif gas is None:
        gas = 1 if total is None else total // (micro * data_parallel_size)
    if total is not None and total != micro * gas * data_parallel_size:
        raise ConfigError(
            "train_batch_size",
            f"{total} != train_micro_batch_size_per_gpu x gradient_accumulation_steps x data-parallel size"
            f" = {micro} x {gas} x {data_parallel_size} (the data-parallel size counts base ranks only)",
            source=json_path,
        )
    if micro < 1 or gas < 1:
        raise ConfigError("train_micro_batch_size_per_gpu", f"micro batch {micro} and accumulation {gas} must be >= 1",
                          source=json_path)
    return micro, gas
