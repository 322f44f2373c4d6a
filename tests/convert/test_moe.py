"""MoE checkpoints of launch/train.py convert, wherever the experts were trained (CPU, gloo).

A colocated run (every base rank holds all 16 experts) and an MA-separation run (3 attention
ranks + 1 expert rank holding the experts in its own engine) of the tiny MoE model: each
exports to Hugging Face (``FapoolGPTForCausalLM`` with the experts under their global ids;
GELU experts have no standard architecture), and the MA one converts to a distributed
checkpoint; every output passes the tool's verification (per-tensor table, fresh-process
probe: fp32 logits within 1e-5 and the same greedy tokens).
"""

from __future__ import annotations

import json
import os

import pytest

from megatron_fapool.testing.launch import ROOT, build_corpus, launch_command, run_ok, train_args

from test_end_to_end import convert, verified

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(str(tmp_path_factory.mktemp("data") / "stdlib"), max_files=20)


def _train(tmp_path, corpus, json_name, nproc):
    cfg = json.load(open(os.path.join(ROOT, "configs", json_name)))
    cfg["fapool"]["model_yaml"] = os.path.join(ROOT, "configs", "models", "tiny_moe.yaml")
    cfg["steps_per_print"] = 1000
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    run_ok(launch_command("torchrun", nproc, "train", train_args(tmp_path / "cfg.json", corpus, tmp_path / "m.jsonl",
                                                                 "--save", str(tmp_path / "run"), iters=2, seq=32)))
    return tmp_path / "run"


@pytest.mark.parametrize("json_name, nproc", [("tiny_moe.json", 1), ("tiny_moe_ma.json", 4)])
def test_moe_checkpoints_export_to_hf(json_name, nproc, corpus, tmp_path):
    run = _train(tmp_path, corpus, json_name, nproc)
    out = convert("export-hf", "--load", run, "--save", tmp_path / "hf", "--probe-tokens", "2x24")
    assert "summary: 77 tensors" in out
    verified(out)
    assert "B loaded as FapoolGPTForCausalLM (torch.float32)" in out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_experts"] == 16 if "num_experts" in config else config["num_moe_experts"] == 16
    if nproc > 1:  # MA separation: the experts came from the expert rank's files
        assert "MA separation" in convert("inspect", run, "--no-tensors")
        out = convert("to-dist", "--load", run, "--save", tmp_path / "dist", "--probe-tokens", "1x24")
        verified(out)
        assert "summary: 77 tensors" in out  # 2 layers x 16 experts x 2 matrices + the rest
