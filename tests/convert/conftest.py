"""What the converter's tests share: a config writer, a corpus and one trained checkpoint.

``rope_tp2`` is a real checkpoint of launch/train.py (the tiny RoPE model, TP 2, ZeRO 1,
2 micro-batches per step, 3 iterations, a checkpoint after each); tests that break it copy it first.
Both are built once per session, whichever xdist worker asks first (tests/conftest.py's ``build_once``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from megatron_fapool.testing.launch import ROOT, build_corpus, launch_command, run_ok, train_args


def write_config_file(path, *, tp: int, gas: int = 1, stage: int = 1, yaml: str = "tiny_dense_rope.yaml") -> str:
    """A tiny model (RoPE by default: configs/models/``yaml``) without the pool, fp32, global batch 2
    (= DP x ``gas``, micro batch 1)."""
    data = json.load(open(os.path.join(ROOT, "configs", "tiny_dense_rope_pool.json")))
    data["fapool"]["model_yaml"] = yaml if os.path.isabs(yaml) else os.path.join(ROOT, "configs", "models", yaml)
    data["fapool"]["attention_pool"].update(enabled=False, pool_size=0)
    data["fapool"]["parallel"]["tensor_model_parallel_size"] = tp
    data.update(gradient_accumulation_steps=gas, train_batch_size=2, steps_per_print=1000)
    data["zero_optimization"]["stage"] = stage
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


@pytest.fixture(scope="session")
def write_config():
    return write_config_file


@pytest.fixture(scope="session")
def corpus(build_once):
    """20 files of the standard library (one build for every worker: tests/conftest.py's build_once)."""
    return build_once("corpus20", lambda d: build_corpus(str(d / "stdlib"), max_files=20))


def _train_rope_tp2(d, corpus) -> dict:
    cfg = write_config_file(d / "tp2.json", tp=2, gas=2)
    run_ok(launch_command("torchrun", 2, "train", train_args(cfg, corpus, d / "m.jsonl", "--save", str(d / "ckpt"),
                                                             "--save-interval", "1", iters=3, seq=64)), timeout=240)
    return {"dir": str(d), "cfg": cfg, "ckpt": str(d / "ckpt")}


@pytest.fixture(scope="session")
def rope_tp2(build_once, corpus):
    """Trained once for every worker (build_once): test_cli, test_dist and test_end_to_end read it."""
    out = build_once("rope_tp2", lambda d: _train_rope_tp2(d, corpus))
    return {**out, "dir": Path(out["dir"])}
