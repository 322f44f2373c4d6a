"""tools/bench_dilated.py runs end to end on CPU (1 process and 2 gloo ranks) and self-checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_fapool.testing.distributed import find_free_port

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--device", "cpu", "--seqlens", "1024", "--heads", "4", "--head-dim", "8",
    "--segments", "128,256", "--rates", "1,2", "--warmup", "1", "--iters", "2",
    "--flex-iters", "1", "--check-seqlen", "300",
]


def run_bench(tmp_path: Path, launcher: list[str], *extra: str) -> str:
    out = tmp_path / "bench.md"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        launcher + [str(ROOT / "tools" / "bench_dilated.py"), *TINY, *extra, "--markdown", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out.read_text()


@pytest.mark.slow
def test_bench_runs_on_cpu_single_process(tmp_path):
    md = run_bench(tmp_path, [sys.executable])
    assert "| 1K | 1 proc | ours |" in md and "| 1K | 1 proc | flex" in md
    assert "FAIL" not in md and "ok: n=300 dq vs float64 definition" in md
    assert "ok: n=1024 ours vs flex, sampled out rows" in md


@pytest.mark.slow
def test_bench_runs_on_two_gloo_ranks(tmp_path):
    md = run_bench(
        tmp_path,
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(find_free_port())],
        "--parallel-modes", "auto,heads",
    )
    assert "| 1K | 2 proc | ours |" in md and "| 1K | 1 proc | ours |" in md
    # 1024 tokens on 2 ranks, segments 128 and 256: every shard is independent (auto), and
    # the head-parallel row is forced alongside.
    assert "ok: n=1024 2 GPUs (local) vs 1 GPU, sampled dq rows" in md and "FAIL" not in md
    assert "ok: n=1024 2 GPUs (heads) vs 1 GPU, sampled dq rows" in md
    lines = md.splitlines()
    auto = [line for line in lines if line.startswith("| 1K | 2 proc | ours |")][0]
    heads = [line for line in lines if line.startswith("| 1K | 2 proc | ours (heads) |")][0]
    assert auto.split("|")[12].strip().endswith("x")  # speedup measured, not left empty
    assert "no communication; 0 collectives" in auto and "8 collectives" in heads


@pytest.mark.slow
def test_bench_row_failing_on_one_rank_is_noted_and_the_run_goes_on(tmp_path):
    # Rank 1 alone "runs out of memory" in the 1-process row: both ranks note it, skip that
    # row's checks, and still measure the later rows (no hang, no desynchronised collective).
    md = run_bench(
        tmp_path,
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(find_free_port())],
        "--debug-fail", "ours,1,1",
    )
    lines = md.splitlines()
    single = [line for line in lines if line.startswith("| 1K | 1 proc | ours |")][0]
    assert "rank 1: OOM" in single and single.split("|")[5].strip() == "–"
    par = [line for line in lines if line.startswith("| 1K | 2 proc | ours |")][0]
    assert par.split("|")[5].strip() != "–"  # the later row ran
    assert "| 1K | 1 proc | flex" in md and "FAIL" not in md
