"""What the end-to-end benchmark tools share: the strategies, their configs, one launched run.

``tools/bench_training.py``, ``bench_inference.py`` and ``bench_mixed_workload.py``
(``from _strategies import ...``) compare the same model and weights under several
parallel layouts on the same GPUs. Each run writes a variant of
the user's JSON (:func:`write_strategy_config`) and launches the real entry point
with ``torchrun`` (:func:`launch`), which reports failures as one line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import yaml

__all__ = ["STRATEGIES", "Strategy", "launch", "strategy", "strategy_arg", "write_strategy_config"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Strategy:
    gpus: int
    tp: int = 1
    pp: int = 1
    pool_size: int = 0  # pool ranks in all (shared evenly by the tp * pp base ranks)


#: Names: ``single``, or ``tp<N>`` / ``pp<M>`` / ``pool[<P>]`` joined (``pool`` = 1 pool
#: rank): ``tp2``, ``pp2``, ``pool3`` (1 base + 3 pool), ``tp4pp2``, ``tp2pool6`` (TP 2
#: + 6 pool ranks, 3 per base rank).
_NAME = re.compile(r"(?:tp(?P<tp>[1-9]\d*))?(?:pp(?P<pp>[1-9]\d*))?(?:pool(?P<pool>[1-9]\d*)?)?")


def strategy(name: str) -> Strategy:
    """The layout a strategy name stands for; ``ValueError`` for a name that is not one."""
    m = _NAME.fullmatch(name)
    if name == "single":
        return Strategy(gpus=1)
    if not name or m is None:
        raise ValueError(f"{name!r} is not a strategy: use single, or tp<N>, pp<M>, pool[<P>] joined"
                         " (e.g. tp2, pp2, pool3, tp4pp2, tp2pool6)")
    tp, pp = int(m["tp"] or 1), int(m["pp"] or 1)
    pool = int(m["pool"] or 1) if "pool" in name else 0
    if pool % (tp * pp):
        raise ValueError(f"{name!r}: {pool} pool ranks cannot be shared evenly by {tp * pp} base ranks")
    return Strategy(gpus=tp * pp + pool, tp=tp, pp=pp, pool_size=pool)


#: The 2-GPU comparison the inference and training benchmarks run by default.
STRATEGIES = {name: strategy(name) for name in ("single", "tp2", "pp2", "pool")}


def strategy_arg(name: str) -> str:
    """argparse ``type`` for a strategy name (a one-line error for a bad one)."""
    try:
        strategy(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def write_strategy_config(json_path: str, strategy: Strategy, workdir: str, name: str) -> str:
    """A copy of ``json_path`` for ``strategy`` (its model YAML copied without ``model_parallel``); returns its path."""
    json_dir = os.path.dirname(os.path.abspath(json_path))
    data = json.load(open(json_path))
    fap = data["fapool"]
    model = yaml.safe_load(open(os.path.join(json_dir, fap["model_yaml"])))
    model.pop("model_parallel", None)
    fap["model_yaml"] = os.path.join(workdir, f"{name}.yaml")
    with open(fap["model_yaml"], "w") as f:
        yaml.safe_dump(model, f)
    fap["parallel"] = {"tensor_model_parallel_size": strategy.tp, "pipeline_model_parallel_size": strategy.pp}
    pool = fap.setdefault("attention_pool", {})
    if pool.get("calibration_file") and not os.path.isabs(pool["calibration_file"]):
        pool["calibration_file"] = os.path.join(json_dir, pool["calibration_file"])
    pool["enabled"] = strategy.pool_size > 0
    if strategy.pool_size:
        pool["pool_size"] = strategy.pool_size
    path = os.path.join(workdir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def _failure(text: str, returncode: int) -> str:
    lines = text.strip().splitlines()
    if any("out of memory" in line.lower() for line in lines):
        return "out of memory"
    reasons = [line for line in lines if line.startswith("fapool: error:")] or [
        line for line in lines if "Error:" in line and "ChildFailedError" not in line]
    return reasons[-1][:200] if reasons else f"exit {returncode}"


def launch(script: str, gpus: int, args: list[str], *, port: int, timeout: float,
           log_path: str | None = None) -> tuple[float, str | None]:
    """Run ``launch/<script>`` on ``gpus`` ranks with torchrun; ``(wall seconds, one-line error or None)``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_port", str(port),
           os.path.join(ROOT, "launch", script), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        with open(log_path, "w") as f:
            f.write(proc.stdout + proc.stderr)
    return wall, (None if proc.returncode == 0 else _failure(proc.stdout + proc.stderr, proc.returncode))
