"""What the converter's tests share: a config writer, a corpus and one trained checkpoint per worker.

``rope_tp2`` is a real checkpoint of launch/train.py (the tiny RoPE model, TP 2, ZeRO 1,
2 micro-batches per step, 3 iterations, a checkpoint after each); tests that break it copy it first.
"""

from __future__ import annotations

import json
import os

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
def corpus(tmp_path_factory):
    return build_corpus(str(tmp_path_factory.mktemp("data") / "stdlib"), max_files=20)


@pytest.fixture(scope="session")
def rope_tp2(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("rope_tp2")
    cfg = write_config_file(d / "tp2.json", tp=2, gas=2)
    run_ok(launch_command("torchrun", 2, "train", train_args(cfg, corpus, d / "m.jsonl", "--save", str(d / "ckpt"),
                                                             "--save-interval", "1", iters=3, seq=64)), timeout=240)
    return {"dir": d, "cfg": cfg, "ckpt": str(d / "ckpt")}
