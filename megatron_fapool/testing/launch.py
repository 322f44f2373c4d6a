"""Launching ``launch/*.py`` end to end from tests: commands, environment, corpus, metrics.

Tests start the real entry points under the real launchers (``deepspeed``, ``torchrun``)
as subprocesses with a hard timeout; these helpers build the commands and read back the
``--metrics-file`` a training run writes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time

from .distributed import find_free_port

__all__ = ["ROOT", "build_corpus", "launch_command", "read_metrics", "run_and_kill", "run_ok", "subprocess_env",
           "train_args"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BIN = os.path.dirname(sys.executable)


def subprocess_env() -> dict:
    """The environment of a launched job: this checkout importable, one thread per rank, unbuffered output."""
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def launch_command(launcher: str, nproc: int, script: str, args: list[str]) -> list[str]:
    """``deepspeed --num_gpus N`` or ``torchrun --nproc_per_node N`` running ``launch/<script>.py`` on a free port."""
    port = str(find_free_port())
    path = os.path.join(ROOT, "launch", f"{script}.py")
    if launcher == "deepspeed":
        return [os.path.join(_BIN, "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, path, *args]
    if launcher == "torchrun":
        return [os.path.join(_BIN, "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port, path, *args]
    raise ValueError(f"unknown launcher {launcher!r}: deepspeed or torchrun")


def run_ok(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion; it must exit 0 (the assertion shows the ends of its output)."""
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def build_corpus(out_prefix: str, *, max_files: int = 60) -> str:
    """A small Megatron indexed dataset of the Python standard library's sources (real text)."""
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                    "--input", sysconfig.get_paths()["stdlib"], "--output-prefix", out_prefix,
                    "--max-files", str(max_files), "--seed", "3"],
                   env=subprocess_env(), check=True, capture_output=True, timeout=120)
    return out_prefix


def read_metrics(path) -> dict[int, dict]:
    """A ``--metrics-file``: iteration -> that iteration's metrics."""
    return {r["iteration"]: r for r in (json.loads(line) for line in open(path))}


def train_args(cfg, data, metrics, *extra, iters: int, seq: int) -> list[str]:
    """``launch/train.py`` flags of a test run: ``iters`` iterations of ``seq`` tokens, every iteration logged
    and written to ``metrics``; ``extra`` flags after them (a repeated flag overrides)."""
    return ["--deepspeed_config", str(cfg), "--data-path", str(data), "--train-iters", str(iters),
            "--seq-length", str(seq), "--log-interval", "1", "--metrics-file", str(metrics), *extra]


_PID = re.compile(r"fapool: rank (\d+) pid (\d+)")


def _kill_when(proc, pattern: str, rank: int, found: dict) -> None:
    """SIGKILL ``rank`` once ``pattern`` was printed and its pid is known.

    Ranks print to one pipe, so a pid line may arrive glued to another rank's output or
    after the pattern: search anywhere in a line, and kill as soon as both are seen.
    """
    pids, seen = {}, False
    for line in proc.stdout:
        found.setdefault("lines", []).append(line)
        pids.update({int(r): int(p) for r, p in _PID.findall(line)})
        seen = seen or pattern in line
        if seen and rank in pids and "killed_at" not in found:
            os.kill(pids[rank], signal.SIGKILL)
            found["killed_at"] = time.monotonic()


def run_and_kill(cmd: list[str], pattern: str, rank: int, timeout: float = 240) -> tuple[int, str, float]:
    """Run ``cmd`` (a launch), SIGKILL ``rank`` once ``pattern`` is printed; ``(exit code, output, seconds from
    the kill to the exit)``. The kill must have happened (the assertion shows the output's end)."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    found: dict = {}
    reader = threading.Thread(target=_kill_when, args=(proc, pattern, rank, found), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    ended = time.monotonic()
    reader.join(timeout=10)
    out = "".join(found.get("lines", []))
    assert "killed_at" in found, out[-3000:]
    return rc, out, ended - found["killed_at"]
