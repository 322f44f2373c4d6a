"""tools/convert_checkpoint.py end to end on checkpoints of launch/train.py and folders of transformers.

* export-hf of a tiny RoPE model (-> Arcee) and of a tiny learned-position model (-> our class,
  trust_remote_code): the tool's own verification loads the export with
  ``AutoModelForCausalLM.from_pretrained`` in a fresh process (megatron_fapool not imported) and
  finds the same fp32 logits (1e-5) and greedy tokens as our model; the greedy tokens equal those
  ``launch/infer.py --load`` generates from the original checkpoint;
* ours -> HF -> ours through the CLI is bitwise;
* import-hf of random-init ``ArceeForCausalLM`` and ``LlamaForCausalLM`` saved by transformers:
  logits match HF's (the tool's verification); ``launch/infer.py --load`` serves HF's greedy
  tokens from the imported Llama; ``launch/train.py --load`` trains 10 iterations on the imported Arcee.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from megatron_fapool.convert.cli import main
from megatron_fapool.convert.listing import describe
from megatron_fapool.convert.sources import open_source
from megatron_fapool.testing.launch import (
    ROOT, launch_command, read_metrics, run_ok, subprocess_env, train_args,
)
from megatron_fapool.runtime import exit_on_user_error

pytest.importorskip("transformers")

PROMPTS = ["def main(", "import os\n"]
NEW_TOKENS = 6


def convert(*args) -> str:
    """The tool's ``main`` in this process (its workers and probes are processes of their own); its output."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = exit_on_user_error(lambda: main([str(a) for a in args]))
    out = buf.getvalue()
    assert code == 0, out[-4000:]
    return out


def verified(out: str) -> float:
    """The relative logits difference the tool's verification printed; it must have passed."""
    assert "verify: PASS" in out and "0 not bitwise equal" in out, out[-3000:]
    assert "B: hf" not in out or "megatron_fapool imported there: no" in out, out[-3000:]
    rel = float(re.search(r"relative ([0-9.e+-]+) \(tolerance", out).group(1))
    assert rel <= 1e-5 and "greedy 8 tokens identical: yes" in out, out[-3000:]
    return rel


def infer_tokens(cfg, load, tmp_path, *extra, nproc=1) -> list[list[int]]:
    metrics = tmp_path / f"infer-{os.path.basename(str(load))}.json"
    args = ["--deepspeed_config", str(cfg), "--load", str(load), "--max-new-tokens", str(NEW_TOKENS),
            "--metrics-json", str(metrics), *extra]
    for p in PROMPTS:
        args += ["--prompt", p]
    run_ok(launch_command("torchrun", nproc, "infer", args), timeout=300)
    rows = json.loads(metrics.read_text())["workloads"][0]["requests"]
    return [(r["prompt_tokens"], r["tokens"]) for r in sorted(rows, key=lambda r: r["id"])]


def hf_greedy(hf_dir, prompts_and_tokens, tmp_path) -> list[list[int]]:
    """Greedy tokens of the export in a fresh process with transformers alone (probe_hf.py)."""
    rows = [torch.tensor(p) for p, _ in prompts_and_tokens]
    torch.save(rows, tmp_path / "rows.pt")
    script = shutil.copy(os.path.join(ROOT, "megatron_fapool", "convert", "probe_hf.py"), tmp_path)
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    remote = "auto_map" in json.loads((hf_dir / "config.json").read_text())
    subprocess.run([sys.executable, script, str(hf_dir), str(tmp_path / "rows.pt"), str(tmp_path / "hf.pt"),
                    "--greedy", str(NEW_TOKENS), "--token-limit", "257"] + (["--trust-remote-code"] if remote else []),
                   env=env, cwd=str(tmp_path), check=True, capture_output=True, timeout=300)
    out = torch.load(tmp_path / "hf.pt")
    assert out["imported_megatron_fapool"] is False
    return out["greedy"]


@pytest.fixture(scope="module")
def rope_run(rope_tp2):
    return Path(rope_tp2["dir"]), rope_tp2["cfg"]


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory, corpus, write_config):
    """3 iterations of launch/train.py of the tiny learned-position model (TP 1, 2 micro-batches per step)."""
    d = tmp_path_factory.mktemp("learned")
    cfg = write_config(d / "cfg.json", tp=1, gas=2, yaml="tiny_dense.yaml")
    run_ok(launch_command("torchrun", 1, "train",
                          train_args(cfg, corpus, d / "m.jsonl", "--save", str(d / "ckpt"), iters=3, seq=64)))
    return d, cfg


@pytest.fixture(scope="module")
def rope_hf(rope_run, tmp_path_factory):
    """export-hf of ``rope_run`` (verified): the folder and the tool's output."""
    hf = tmp_path_factory.mktemp("rope_hf") / "hf"
    return hf, convert("export-hf", "--load", rope_run[0] / "ckpt", "--save", hf)


@pytest.mark.parametrize("run, arch", [("rope_run", "ArceeForCausalLM"), ("learned_run", "FapoolGPTForCausalLM")])
def test_export_hf_equals_our_inference(run, arch, request, tmp_path):
    d, cfg = request.getfixturevalue(run)
    if run == "rope_run":
        hf, out = request.getfixturevalue("rope_hf")
    else:
        hf = tmp_path / "hf"
        out = convert("export-hf", "--load", d / "ckpt", "--save", hf)
    verified(out)
    assert f"B loaded as {arch} (torch.float32)" in out
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == [arch] and config["dtype"] == "float32"
    listing = describe(open_source(str(hf)))
    assert "kind          hf" in listing and "model.embed_tokens.weight" in listing
    ours = infer_tokens(cfg, d / "ckpt", tmp_path, nproc=2 if run == "rope_run" else 1)
    assert hf_greedy(hf, ours, tmp_path) == [t for _, t in ours]


def test_ours_to_hf_to_ours_is_bitwise(rope_run, rope_hf, tmp_path, write_config):
    d, cfg = rope_run
    hf, _ = rope_hf  # the export of the test above (the same command; verified there)
    cfg = write_config(tmp_path / "tp1.json", tp=1, gas=2)  # back at another TP: the common form is TP 1
    out = convert("import-hf", "--hf", hf, "--deepspeed_config", cfg, "--save", tmp_path / "back",
                  "--probe-tokens", "")  # the tensors are compared bitwise below, probes ran in the test above
    assert "verify: PASS" in out and "0 not bitwise equal" in out
    a, b = open_source(str(d / "ckpt")), open_source(str(tmp_path / "back"))
    wa, wb = a.weights(), b.weights()
    assert wa.keys() == wb.keys()
    assert all(wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]) for k in wa)
    assert b.detail["tp"] == 1 and b.detail["iteration"] == 0


@pytest.mark.parametrize("kind, tp", [("arcee", 1), ("llama", 1)])  # TP 2 writes: test_reshard.py, the round trip above
def test_import_hf_then_train_and_serve(kind, tp, corpus, tmp_path, write_config):
    import transformers

    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, eos_token_id=256, bos_token_id=None)
    torch.manual_seed(0)
    model = (transformers.ArceeForCausalLM(transformers.ArceeConfig(hidden_act="gelu", **shape)) if kind == "arcee"
             else transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)))
    model.save_pretrained(tmp_path / "hf")
    # the run's config names the model YAML import-hf writes into the checkpoint
    cfg = write_config(tmp_path / "cfg.json", tp=tp, gas=2, yaml=str(tmp_path / "ckpt" / "model.yaml"))
    out = convert("import-hf", "--hf", tmp_path / "hf", "--deepspeed_config", cfg, "--save", tmp_path / "ckpt")
    verified(out)
    lm = yaml.safe_load((tmp_path / "ckpt" / "model.yaml").read_text())["language_model"]
    assert lm["activation_func"] == ("gelu" if kind == "arcee" else "swiglu") and lm["position_embedding_type"] == "rope"
    # Serving an imported checkpoint with launch/infer.py is shown on the Llama one (an Arcee checkpoint served
    # against HF's greedy tokens: test_export_hf_equals_our_inference[rope_run]); training one on the Arcee one.
    if kind == "llama":
        served = infer_tokens(cfg, tmp_path / "ckpt", tmp_path, nproc=tp)
        assert hf_greedy(tmp_path / "hf", served, tmp_path) == [t for _, t in served]
        return
    metrics = tmp_path / "m.jsonl"
    run_ok(launch_command("torchrun", tp, "train", train_args(cfg, corpus, metrics, "--load", str(tmp_path / "ckpt"),
                                                             "--save", str(tmp_path / "trained"), iters=10, seq=64)))
    m = read_metrics(metrics)
    assert sorted(m) == list(range(1, 11))
    assert m[10]["loss"] < m[1]["loss"]
