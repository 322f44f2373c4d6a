"""launch/train.py with MA separation on CPU: 3 attention ranks + 1 expert rank (configs/tiny_moe_ma.json).

* MA separation equals colocated MoE (the same model on 3 base ranks: same DP 3, seed, data and
  initial weights) within rel 1e-4 per iteration — lm loss, load-balancing and z losses, the
  global gradient norm (attention *and* expert parameters: it is what clipping divides by), LR —
  over 10 iterations with ZeRO 1, and with ZeRO 2 and ping-pong (2 parts per micro-batch of 2),
  gradient accumulation 2, clipping 1.0;
* the checkpoint holds the expert rank's engine under the same tag with a manifest, and the
  checkpoint converter exports it to HF and to a distributed checkpoint, verified;
* SIGKILL of the expert rank ends every rank within 60 s, naming it; resuming from the last
  complete checkpoint reproduces the uninterrupted run's losses and final weights exactly;
* bad input exits 2 with one line before any work.

The expert weights start as the colocated model's (training/loop.py: every attention rank
builds the colocated model of the seed, the first sends its experts to the expert ranks).
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from megatron_fapool.testing.launch import build_corpus, launch_command, read_metrics, run_and_kill, run_ok, train_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MA = os.path.join(ROOT, "configs", "tiny_moe_ma.json")
ITERS = 10  # checkpoints every 5: the kill at 7 leaves 5 as the last complete one
KILL_AT = 7
SEQ = 256
REL = 1e-4


def _config(path, *, ma: bool, stage: int = 1, mutate=None) -> str:
    data = json.load(open(MA))
    data["fapool"]["model_yaml"] = os.path.join(ROOT, "configs", "models", "tiny_moe.yaml")
    data["fapool"]["ma_separation"]["enabled"] = ma
    data["fapool"]["ma_separation"]["z_loss_coeff"] = 1e-3  # a model key: the colocated run has it too
    data["train_micro_batch_size_per_gpu"] = 2  # ping-pong can cut it in two
    data["gradient_accumulation_steps"] = 2
    data["gradient_clipping"] = 1.0
    data["zero_optimization"]["stage"] = stage
    data["steps_per_print"] = 1000
    if mutate:
        mutate(data)
    path.write_text(json.dumps(data))
    return str(path)


def _train_args(cfg, data, metrics, *extra) -> list[str]:
    return train_args(cfg, data, metrics, *extra, iters=ITERS, seq=SEQ)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * abs(b)


@pytest.fixture(scope="module")
def corpus(build_once):
    """60 files of the standard library, built once for test_train.py and test_train_ma.py (tests/conftest.py)."""
    return build_once("corpus60", lambda d: build_corpus(str(d / "stdlib")))


@pytest.fixture(scope="module")
def colocated(corpus, tmp_path_factory):
    """The same MoE model on 3 base ranks (experts on every rank), ZeRO 1."""
    d = tmp_path_factory.mktemp("colocated")
    cfg = _config(d / "cfg.json", ma=False)
    proc = run_ok(launch_command("torchrun", 3, "train", _train_args(cfg, corpus, d / "m.jsonl")))
    return {"metrics": read_metrics(d / "m.jsonl"), "stdout": proc.stdout}


@pytest.fixture(scope="module")
def ma_run(corpus, tmp_path_factory):
    """MA separation 3 + 1, ZeRO 1, deepspeed launcher, checkpoints every 5 iterations."""
    d = tmp_path_factory.mktemp("ma")
    cfg = _config(d / "cfg.json", ma=True)
    args = _train_args(cfg, corpus, d / "m.jsonl", "--save", str(d / "ckpt"), "--save-interval", "5")
    proc = run_ok(launch_command("deepspeed", 4, "train", args))
    return {"dir": d, "cfg": cfg, "metrics": read_metrics(d / "m.jsonl"), "stdout": proc.stdout}


def _assert_equal_runs(ma: dict, colo: dict, iterations) -> None:
    assert sorted(ma) == sorted(colo) == list(iterations)
    for it in iterations:
        a, b = ma[it], colo[it]
        for key in ("loss", "grad_norm", "load_balancing_loss", "z_loss"):
            assert a[key] is not None and _close(a[key], b[key]), (it, key, a[key], b[key])
        assert a["learning_rate"] == b["learning_rate"], it
        assert a["micro_batches"] == b["micro_batches"] == 6  # 3 replicas x 2 accumulation steps


def test_ma_equals_colocated_zero1(ma_run, colocated):
    _assert_equal_runs(ma_run["metrics"], colocated["metrics"], range(1, ITERS + 1))
    m = ma_run["metrics"]
    assert m[ITERS]["loss"] < m[1]["loss"]  # it learns
    # clipping at 1.0 was active in some iterations (the norm clipped by is the global one)
    assert any(r["grad_norm"] > 1.0 for r in m.values())
    out = ma_run["stdout"]
    assert "MA separation: attention ranks hold 0 expert parameters" in out
    assert "load balancing loss:" in out and "z loss:" in out
    # the time predictor checked the ratio at start-up and reports its error against the measured iterations
    assert "== MA time predictor (analytic" in out and re.search(r"MA ratio 3:1 for .*predicted per layer", out)
    assert re.search(rf"predictor MAPE: iteration [0-9.]+% \({ITERS} points\)", out), out[-2000:]
    # the expert rank served every layer's forward and backward and stepped in every iteration, on the
    # attention ranks' LR schedule (its last LR is the attention ranks' last LR)
    line = re.search(r"expert rank 0 \(experts 0-15\): served (\d+) forward / (\d+) backward calls.*?"
                     r"(\d+) steps to iteration (\d+) \(lr ([0-9.E+-]+)\), (\d+) checkpoints saved", out)
    assert line, out[-3000:]
    fwd, bwd, steps, at, lr, saved = line.groups()
    assert int(fwd) == int(bwd) == ITERS * 2 * 2  # iterations x accumulation x MoE layers
    assert int(steps) == int(at) == ITERS and int(saved) == ITERS // 5
    assert float(lr) == pytest.approx(m[ITERS]["learning_rate"], rel=1e-6)


def test_ma_zero2_pingpong_equals_colocated(corpus, colocated, tmp_path):
    """ZeRO 2 on both engines (the expert engine reduces into its partitions during each backward
    piece), with ping-pong: each micro-batch of 2 runs as 2 parts taking turns."""
    iters = ITERS

    def pingpong(data):
        data["fapool"]["ma_separation"]["micro_batches"] = 2

    cfg = _config(tmp_path / "cfg.json", ma=True, stage=2, mutate=pingpong)
    args = _train_args(cfg, corpus, tmp_path / "m.jsonl") + ["--train-iters", str(iters)]
    proc = run_ok(launch_command("torchrun", 4, "train", args))
    served = re.search(r"expert rank 0 \(experts 0-15\): served (\d+) forward / (\d+) backward", proc.stdout)
    # iterations x accumulation x MoE layers x parts
    assert served and int(served.group(1)) == int(served.group(2)) == iters * 2 * 2 * 2
    colo = {it: r for it, r in colocated["metrics"].items() if it <= iters}
    _assert_equal_runs(read_metrics(tmp_path / "m.jsonl"), colo, range(1, iters + 1))


def test_checkpoint_holds_the_expert_rank(ma_run):
    ckpt = ma_run["dir"] / "ckpt"
    assert (ckpt / "latest").read_text() == f"iter_{ITERS:07d}"
    tag = ckpt / f"iter_{ITERS:07d}"
    meta = json.loads((tag / "fapool_checkpoint.json").read_text())
    assert meta["iteration"] == ITERS and meta["model"]["ma_separation"] is True
    names = os.listdir(tag / "experts")
    assert "mp_rank_00_model_states.pt" in names and "manifest.json" in names, names
    assert any(n.endswith("optim_states.pt") for n in names), names  # ZeRO 1: the expert optimizer state
    manifest = json.loads((tag / "experts" / "manifest.json").read_text())
    assert manifest["num_experts"] == 16 and manifest["layout"]["num_expert"] == 1
    assert manifest["expert_ranks"] == [{"rank": 3, "stage": 0, "index": 0, "experts": list(range(16)),
                                         "file": "mp_rank_00_model_states.pt"}]
    experts = torch.load(tag / "experts" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    keys = [k for k in experts["module"] if k.endswith("weight")]
    assert len(keys) == 2 * 16 * 2, keys  # layers x experts x (fc1, fc2)
    attention = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert not any(".mlp.experts." in k for k in attention["module"])


def test_the_checkpoint_converts_to_hf_and_dist(ma_run, tmp_path, capsys):
    """tools/convert_checkpoint.py on this MA checkpoint: the experts come from the expert rank's files by
    global id; the HF export (our class: GELU experts have no standard architecture) and the distributed
    checkpoint pass the tool's verification (every tensor bitwise; the export's fresh-process probe:
    fp32 logits within 1e-5, the same greedy tokens)."""
    pytest.importorskip("transformers")
    from megatron_fapool.convert.cli import main

    ckpt = ma_run["dir"] / "ckpt"
    assert main(["export-hf", "--load", str(ckpt), "--save", str(tmp_path / "hf"), "--probe-tokens", "2x24"]) == 0
    out = capsys.readouterr().out
    assert "summary: 77 tensors" in out and "0 not bitwise equal" in out  # 2 layers x 16 experts x 2 + the rest
    assert "B loaded as FapoolGPTForCausalLM (torch.float32), megatron_fapool imported there: no" in out
    rel = float(re.search(r"relative ([0-9.e+-]+) \(tolerance", out).group(1))
    assert rel <= 1e-5 and "greedy 8 tokens identical: yes" in out and "verify: PASS" in out, out[-3000:]
    assert main(["to-dist", "--load", str(ckpt), "--save", str(tmp_path / "dist"), "--probe-tokens", ""]) == 0
    out = capsys.readouterr().out
    assert "summary: 77 tensors" in out and "0 not bitwise equal" in out and "verify: PASS" in out, out[-3000:]


def test_sigkill_of_the_expert_rank_then_resume(ma_run, corpus, tmp_path):
    """SIGKILL expert rank 3 at iteration 7: every rank exits non-zero within 60 s naming it, ``latest`` stays
    on iteration 5; --load resumes there and reproduces the uninterrupted run exactly."""
    ckpt = tmp_path / "ckpt"
    args = _train_args(ma_run["cfg"], corpus, tmp_path / "killed.jsonl", "--save", str(ckpt), "--save-interval", "5")
    rc, out, took = run_and_kill(launch_command("torchrun", 4, "train", args), f"iteration {KILL_AT:>8d}/", 3)
    assert rc != 0 and took < 60
    named = ("lost contact with rank(s) [3]" in out or "expert rank 3 (experts 0-15)" in out
             or re.search(r"Root Cause.*?rank\s*:\s*3 \(local_rank: 3\)", out, re.S))
    assert named, out[-3000:]
    assert (ckpt / "latest").read_text() == "iter_0000005"

    resumed = tmp_path / "resumed.jsonl"
    args = _train_args(ma_run["cfg"], corpus, resumed, "--save", str(ckpt), "--save-interval", "5", "--load", str(ckpt))
    proc2 = run_ok(launch_command("torchrun", 4, "train", args))
    assert "resumed from" in proc2.stdout and "at iteration 5" in proc2.stdout
    after, straight = read_metrics(resumed), ma_run["metrics"]
    assert sorted(after) == list(range(6, ITERS + 1))
    for it in after:
        for key in ("loss", "grad_norm", "load_balancing_loss", "z_loss", "learning_rate"):
            assert after[it][key] == straight[it][key], (it, key, after[it][key], straight[it][key])
    # bit-identical final weights on both roles
    for shard in ("mp_rank_00_model_states.pt", os.path.join("experts", "mp_rank_00_model_states.pt")):
        a = torch.load(ma_run["dir"] / "ckpt" / f"iter_{ITERS:07d}" / shard, map_location="cpu", weights_only=False)
        b = torch.load(ckpt / f"iter_{ITERS:07d}" / shard, map_location="cpu", weights_only=False)
        assert a["module"].keys() == b["module"].keys()
        for name, t in a["module"].items():
            if torch.is_tensor(t):
                assert torch.equal(t, b["module"][name]), (shard, name)


# ---- bad input: rank 0 alone fails in the preflight, before any process group ----

def _error_line(proc) -> str:
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fapool: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def _precision(kind: str, stage: int):
    def mutate(d):
        d[kind] = {"enabled": True}
        d["zero_optimization"]["stage"] = stage
    return mutate


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (_precision("bf16", 0), "zero_optimization.stage: 0 with bf16 and MA separation"),
        (_precision("fp16", 1), "fp16.enabled: fp16 with MA separation"),
    ],
)
def test_bad_ma_configs(rank0, tmp_path, corpus, mutate, expected):
    cfg = _config(tmp_path / "c.json", ma=True, mutate=mutate)
    line = _error_line(rank0("train", ["--deepspeed_config", cfg, "--data-path", corpus, "--train-iters", "2"]))
    assert expected in line, line


def test_resume_checks_the_expert_placement(rank0, tmp_path, corpus, ma_run):
    ckpt = str(ma_run["dir"] / "ckpt")
    # the experts on 2 expert ranks (2 + 2) instead of 1 (3 + 1)
    cfg = _config(tmp_path / "c.json", ma=True,
                  mutate=lambda d: d["fapool"]["ma_separation"].update(attention_expert_ratio="1:1"))
    line = _error_line(rank0("train", ["--deepspeed_config", cfg, "--data-path", corpus, "--train-iters", "30",
                                       "--load", ckpt]))
    assert "--load" in line and "holds the experts of 1 expert rank(s), 16 experts each" in line, line
    assert "places 16 experts on 2 expert rank(s), 8 each" in line, line
    # an MA checkpoint is not a colocated one
    cfg = _config(tmp_path / "d.json", ma=False)
    line = _error_line(rank0("train", ["--deepspeed_config", cfg, "--data-path", corpus, "--train-iters", "30",
                                       "--load", ckpt], world=3))
    assert "checkpoint of another model" in line and "ma_separation=True (this run: None)" in line, line
