"""launch/train.py end to end on CPU, through the deepspeed launcher and torchrun.

* pool on (2 base TP ranks + 2 pool ranks) equals pool off (2 base ranks), 20 iterations;
* a run killed with SIGKILL exits non-zero quickly, and rerunning with --load resumes
  from the last complete checkpoint and reproduces the uninterrupted run exactly;
* a killed pool rank ends every rank quickly, naming it;
* bad input exits 2 with one line before any work.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from megatron_fapool.testing.launch import build_corpus, launch_command, read_metrics, run_and_kill, run_ok, train_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny_dense_pool.json")
ITERS = 20
SEQ = 256  # threshold 128: short documents stay local, longer ones use the pool


def _config(path, *, pool: bool, mutate=None) -> str:
    data = json.load(open(TINY))
    data["fapool"]["model_yaml"] = os.path.join(ROOT, "configs", "models", "tiny_dense.yaml")
    data["fapool"]["attention_pool"]["enabled"] = pool
    data["steps_per_print"] = 1000
    if mutate:
        mutate(data)
    path.write_text(json.dumps(data))
    return str(path)


def _train_args(cfg, data, metrics, *extra) -> list[str]:
    return train_args(cfg, data, metrics, *extra, iters=ITERS, seq=SEQ)


@pytest.fixture(scope="module")
def corpus(build_once):
    """60 files of the standard library, built once for test_train.py and test_train_ma.py (tests/conftest.py)."""
    return build_once("corpus60", lambda d: build_corpus(str(d / "stdlib")))


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory):
    """Pool on, deepspeed launcher, checkpoints every 10 iterations."""
    d = tmp_path_factory.mktemp("pool_on")
    cfg = _config(d / "cfg.json", pool=True)
    args = _train_args(cfg, corpus, d / "m.jsonl", "--save", str(d / "ckpt"), "--save-interval", "10")
    proc = run_ok(launch_command("deepspeed", 4, "train", args))
    return {"dir": d, "cfg": cfg, "metrics": read_metrics(d / "m.jsonl"), "stdout": proc.stdout}


def test_pool_on_equals_pool_off(straight_run, corpus, tmp_path):
    on = straight_run["metrics"]
    assert sorted(on) == list(range(1, ITERS + 1))
    # the distributed path ran: some micro-batches pooled, some local, the pool ranks served them
    pooled = sum(r["pooled_micro_batches"] for r in on.values())
    assert 0 < pooled < ITERS, pooled
    assert sum(r["activations"] for r in on.values()) >= 1
    out = straight_run["stdout"]
    assert "pool rank for base rank 0: served" in out and "pool rank for base rank 1: served" in out
    assert "served 0 forward" not in out
    # a pooled micro-batch's calls are announced once per pass (forward, backward): a header per pass, not per call
    served = re.findall(r"served (\d+) forward / (\d+) backward calls in (\d+) headers", out)
    assert len(served) == 2, out  # both pool ranks
    for fwd, bwd, headers in served:
        passes = int(fwd) // 2  # the tiny model's 2 layers per pooled micro-batch
        assert int(headers) == 2 * passes + 1 < int(fwd) + int(bwd), (fwd, bwd, headers)  # + the shutdown

    cfg_off = _config(tmp_path / "off.json", pool=False)
    run_ok(launch_command("torchrun", 2, "train", _train_args(cfg_off, corpus, tmp_path / "off.jsonl")))
    off = read_metrics(tmp_path / "off.jsonl")
    assert sorted(off) == sorted(on)
    for it in on:
        a, b = on[it]["loss"], off[it]["loss"]
        assert abs(a - b) <= 1e-4 * abs(b), (it, a, b)
        assert off[it]["pooled_micro_batches"] == 0
    assert on[ITERS]["loss"] < on[1]["loss"]  # it learns


def _dp2(data, *, pool: bool, stage: int, tmp):
    data["fapool"]["parallel"]["tensor_model_parallel_size"] = 1
    data["zero_optimization"]["stage"] = stage
    data["gradient_accumulation_steps"] = 2
    data["csv_monitor"] = {"enabled": True, "output_path": str(tmp / "monitor"), "job_name": "dp2"}


def test_data_parallel_zero2_with_accumulation(corpus, tmp_path):
    """2 base replicas (DP 2, ZeRO-2, 2 micro-batches per step), each with its own pool rank,
    equal the same run at ZeRO-0 without the pool; DeepSpeed's csv monitor gets our metrics."""
    iters = ["--train-iters", "6"]
    on = _config(tmp_path / "on.json", pool=True, mutate=lambda d: _dp2(d, pool=True, stage=2, tmp=tmp_path / "on"))
    off = _config(tmp_path / "off.json", pool=False,
                  mutate=lambda d: _dp2(d, pool=False, stage=0, tmp=tmp_path / "off"))
    # torchrun: the deepspeed launcher is straight_run's (and the killed run's below)
    out = run_ok(launch_command("torchrun", 4, "train", _train_args(on, corpus, tmp_path / "on.jsonl") + iters)).stdout
    run_ok(launch_command("torchrun", 2, "train", _train_args(off, corpus, tmp_path / "off.jsonl") + iters))
    a, b = read_metrics(tmp_path / "on.jsonl"), read_metrics(tmp_path / "off.jsonl")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for it in a:
        assert abs(a[it]["loss"] - b[it]["loss"]) <= 1e-4 * abs(b[it]["loss"]), (it, a[it]["loss"], b[it]["loss"])
        assert a[it]["micro_batches"] == 4  # 2 replicas x 2 accumulation steps, summed over replicas
    assert sum(r["pooled_micro_batches"] for r in a.values()) > 0
    assert "global batch size:     4" in out
    assert "pool rank for base rank 0: served" in out and "pool rank for base rank 1: served" in out
    csvs = [f for _, _, fs in os.walk(tmp_path / "on" / "monitor") for f in fs]
    assert any("lm_loss" in f for f in csvs) and any("pooled_micro_batches" in f for f in csvs), csvs


def test_checkpoints_are_complete_and_committed(straight_run):
    ckpt = straight_run["dir"] / "ckpt"
    assert (ckpt / "latest").read_text() == "iter_0000020"
    for tag in ("iter_0000010", "iter_0000020"):
        meta = json.loads((ckpt / tag / "fapool_checkpoint.json").read_text())
        assert meta["iteration"] == int(tag[5:])
        assert meta["model"]["tensor_model_parallel_size"] == 2
        names = os.listdir(ckpt / tag)
        assert "mp_rank_00_model_states.pt" in names and "mp_rank_01_model_states.pt" in names  # one file per TP shard


def test_sigkill_then_resume_loses_nothing_saved(straight_run, corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    metrics = tmp_path / "killed.jsonl"
    args = _train_args(straight_run["cfg"], corpus, metrics, "--save", str(ckpt), "--save-interval", "5")
    rc, _, took = run_and_kill(launch_command("deepspeed", 4, "train", args), f"iteration {12:>8d}/", 1)
    assert rc != 0 and took < 60
    assert (ckpt / "latest").read_text() == "iter_0000010"

    resumed = tmp_path / "resumed.jsonl"
    args = _train_args(straight_run["cfg"], corpus, resumed, "--save", str(ckpt), "--save-interval", "5",
                       "--load", str(ckpt))
    proc2 = run_ok(launch_command("torchrun", 4, "train", args))  # resumed under the other launcher
    assert "resumed from" in proc2.stdout and "at iteration 10" in proc2.stdout
    after = read_metrics(resumed)
    assert sorted(after) == list(range(11, ITERS + 1))
    straight = straight_run["metrics"]
    for it in after:  # the resumed run continues exactly as the uninterrupted one
        a, b = after[it], straight[it]
        assert a["pooled_micro_batches"] == b["pooled_micro_batches"] and a["learning_rate"] == b["learning_rate"]
        assert a["loss"] == b["loss"], (it, a["loss"], b["loss"])
    assert (ckpt / "latest").read_text() == "iter_0000020"
    # and ends with bit-identical weights (each TP shard)
    for shard in ("mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"):
        a = torch.load(straight_run["dir"] / "ckpt" / "iter_0000020" / shard, map_location="cpu", weights_only=False)
        b = torch.load(ckpt / "iter_0000020" / shard, map_location="cpu", weights_only=False)
        assert a["module"].keys() == b["module"].keys()
        for name, t in a["module"].items():
            if torch.is_tensor(t):
                assert torch.equal(t, b["module"][name]), name


def test_sigkill_of_a_pool_rank_ends_every_rank(corpus, tmp_path):
    """SIGKILL pool rank 2 (it serves base rank 0) mid-run: every rank exits non-zero within 60 s, naming rank 2."""
    cfg = _config(tmp_path / "c.json", pool=True)
    args = _train_args(cfg, corpus, tmp_path / "m.jsonl") + ["--train-iters", "400"]
    rc, out, took = run_and_kill(launch_command("torchrun", 4, "train", args), f"iteration {3:>8d}/", 2)
    assert rc != 0 and took < 60
    # Named by whoever sees it first: the base rank (its pooled call failed), the liveness
    # monitor, or the launcher's root-cause report (torchrun stops the others at once).
    named = (
        "lost contact with rank(s) [2]" in out
        or "lost rank 2 (pool)" in out
        or re.search(r"Root Cause.*?rank\s*:\s*2 \(local_rank: 2\)", out, re.S)
    )
    assert named, out[-3000:]


# ---- bad input: rank 0 alone fails in the preflight, before any process group ----

def _error_line(proc) -> str:
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fapool: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def test_missing_data_path(rank0, tmp_path):
    cfg = _config(tmp_path / "c.json", pool=True)
    line = _error_line(rank0("train", ["--deepspeed_config", cfg, "--data-path", str(tmp_path / "nope"),
                                       "--train-iters", "2"]))
    assert "--data-path" in line and "nope.bin not found" in line and "tools/preprocess_data.py" in line


def test_zero_stage_3_is_refused(rank0, tmp_path, corpus):
    cfg = _config(tmp_path / "c.json", pool=True, mutate=lambda d: d["zero_optimization"].update(stage=3))
    line = _error_line(rank0("train", ["--deepspeed_config", cfg, "--data-path", corpus, "--train-iters", "2"]))
    assert "zero_optimization.stage: 3 is not supported" in line


def test_checkpoint_of_another_model_shape(rank0, tmp_path, straight_run, corpus):
    yaml_text = open(os.path.join(ROOT, "configs", "models", "tiny_dense.yaml")).read()
    (tmp_path / "wide.yaml").write_text(yaml_text.replace("hidden_size: 64", "hidden_size: 96"))
    cfg = _config(tmp_path / "c.json", pool=True)
    line = _error_line(rank0("train", ["--deepspeed_config", cfg, "--yaml-cfg", str(tmp_path / "wide.yaml"),
                               "--data-path", corpus, "--train-iters", "30",
                               "--load", str(straight_run["dir"] / "ckpt")]))
    assert "--load" in line and "checkpoint of another model" in line and "hidden_size=64 (this run: 96)" in line


def test_saving_over_another_runs_checkpoints_is_refused(rank0, tmp_path, straight_run, corpus):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight_run["dir"] / "ckpt", ckpt)
    cfg = _config(tmp_path / "c.json", pool=True)
    line = _error_line(rank0("train", ["--deepspeed_config", cfg, "--data-path", corpus, "--train-iters", "30",
                               "--save", str(ckpt)]))
    assert "already holds checkpoint 'iter_0000020'" in line and f"--load {ckpt}" in line


@pytest.mark.parametrize(
    "extra, mutate, expected",
    [
        (["--seq-length", "99999"], None, "--seq-length: 99999 exceeds max_position_embeddings"),
        (["--save-interval", "5"], None, "--save-interval: given without --save"),
        (["--train-iters", "0"], None, "--train-iters: must be >= 1"),
        ([], lambda d: d.update(train_batch_size=3), "train_batch_size: 3 !="),
        ([], lambda d: d["fapool"]["parallel"].update(pipeline_model_parallel_size=2),
         "launch/train.py drives one pipeline stage"),
    ],
)
def test_bad_flags_and_configs(rank0, tmp_path, corpus, extra, mutate, expected):
    cfg = _config(tmp_path / "c.json", pool=True, mutate=mutate)
    args = ["--deepspeed_config", cfg, "--data-path", corpus]
    args += [] if "--train-iters" in extra else ["--train-iters", "2"]
    line = _error_line(rank0("train", args + extra))
    assert expected in line, line


def _model_yaml(tmp_path, old: str, new: str):
    """A mutation pointing the config at a copy of the tiny model YAML with ``old`` replaced by ``new``."""
    src = open(os.path.join(ROOT, "configs", "models", "tiny_dense.yaml")).read()
    (tmp_path / "m.yaml").write_text(src.replace(old, new))
    return lambda d: d["fapool"].update(model_yaml=str(tmp_path / "m.yaml"))


@pytest.mark.parametrize(
    "mutate, yaml_edit, world, expected",
    [
        (lambda d: d["fapool"]["attention_pool"].update(treshold=64), None, 4,
         "fapool.attention_pool.treshold: unknown key"),
        (lambda d: d["fapool"]["attention_pool"].update(pool_size=4), None, 4,
         "attention_pool.pool_size=4 does not fit a world of 4 ranks"),
        (lambda d: d["fapool"]["attention_pool"].update(threshold=-5), None, 4, "fapool.attention_pool.threshold"),
        (lambda d: d["fapool"]["parallel"].update(tensor_model_parallel_size=3), None, 5,
         "not divisible by tensor_model_parallel_size=3"),
        (None, ("num_attention_heads: 4", "num_attention_heads: four"), 4,
         "language_model.num_attention_heads: got 'four'"),
        (None, ("  attention_dropout: 0.0", "  attention_dropout: 0.0\n  moe_router_topk: 2"), 4,
         "moe_router_topk given without num_moe_experts"),
    ],
)
def test_bad_config_or_layout(rank0, tmp_path, corpus, mutate, yaml_edit, world, expected):
    if yaml_edit is not None:
        mutate = _model_yaml(tmp_path, *yaml_edit)
    cfg = _config(tmp_path / "c.json", pool=True, mutate=mutate)
    line = _error_line(rank0("train", ["--deepspeed_config", cfg, "--data-path", corpus, "--train-iters", "2"],
                             world=world))
    assert expected in line, line
