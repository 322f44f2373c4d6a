"""launch/infer.py with MA separation, against the colocated model's greedy tokens, and losing an expert rank.

One colocated MoE checkpoint (configs/models/tiny_moe.yaml, random weights, written here the
way launch/train.py writes one) and its greedy tokens from the same model without a KV
cache (the reference: a full forward per token) serve every case:

* colocated at DP 2 (two replicas, requests split between them) and MA separation at
  3 + 1 (three attention replicas in lockstep, one expert rank holding all 16 experts)
  give the reference tokens for a batch of mixed-length prompts; the expert rank's
  counters show that it served every token of every prefill and decode step (top-k rows
  each). The 3 + 1 run loads the same weights as an MA checkpoint trained at 2 + 2
  (attention file without experts, ``experts/`` files and manifest as launch/train.py
  writes them), the 2 + 2 runs below the colocated one: experts go by Megatron's global
  ids, whatever the placement they were saved from;
* at 2 + 2 with ``on_expert_loss: "degrade"``, kill -9 of expert rank 3 mid-decode: the
  batch finishes, its experts 8-15 are masked, the tokens rerouted are reported, and every
  token equals the colocated model's with experts 8-15 masked from the token the loss was
  noticed at (so the failed step was undone and redone exactly);
* the same without the option: every rank exits non-zero within seconds, naming
  "expert rank 3 (experts 8-15)".

The 2 + 2 runs start one process per rank (as a cluster's own process manager would):
torchrun and the deepspeed launcher stop all their workers when one dies.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from megatron_fapool.testing.distributed import find_free_port, run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INFER = os.path.join(ROOT, "launch", "infer.py")
COLOCATED = os.path.join(ROOT, "configs", "tiny_moe.json")
MA = os.path.join(ROOT, "configs", "tiny_moe_ma.json")
PROMPTS = ["hi", "def main():", "The quick brown fox jumps over the lazy dog.", "import os", "x = [1, 2, 3]"]
NEW = 6
DEGRADED_NEW = 40  # the 2 + 2 runs decode long enough to be killed in the middle
KILL_AT = "decode step 2:"
TOKEN_LIMIT = 257  # the byte tokenizer's ids: infer.py generates only those


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def _masked_greedy(model, prompt, new, masked_from, routers):
    """Greedy tokens of ``prompt`` without a cache; experts 8-15 masked from token ``masked_from`` on."""
    from megatron_fapool.testing.megatron_reference import cpu_reference_shims

    seq = list(prompt)
    with cpu_reference_shims():
        for t in range(new):
            for router in routers:
                router.unmask_all()
                if masked_from is not None and t >= masked_from:
                    router.mask_experts(range(8, 16))
            n = len(seq)
            mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)[None, None]
            logits = model(torch.tensor([seq]), torch.arange(n)[None], mask)
            seq.append(int(logits[0, -1, :TOKEN_LIMIT].argmax()))
    return seq[len(prompt):]


def _colocated_model(state=None):
    """The colocated tiny MoE model of this package (Megatron's MoE layer, our router), random or ``state``."""
    from megatron.core import parallel_state

    from megatron_fapool.config import load_run_config
    from megatron_fapool.models.gpt import build_gpt_model, moe_layers

    cfg = load_run_config(COLOCATED)
    parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    torch.manual_seed(5)
    model = build_gpt_model(cfg).eval()
    if state is not None:
        model.load_state_dict(state, strict=True)
    return cfg, model, [m.router for m in moe_layers(model)]


def _commit(ckpt_dir, tag, meta):
    from megatron_fapool.training import checkpoint as ckpt

    with open(os.path.join(ckpt_dir, tag, ckpt.MARKER), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(ckpt_dir, "latest"), "w") as f:
        f.write(tag)


def _write_checkpoint_body(rank, world, ckpt_dir, ma_dir):
    """The model as a colocated checkpoint and as an MA checkpoint of 2 + 2 (launch/train.py's layouts),
    and the reference tokens."""
    import re

    from megatron_fapool.config import load_run_config
    from megatron_fapool.data import ByteTokenizer
    from megatron_fapool.parallel import compute_layout
    from megatron_fapool.training import checkpoint as ckpt

    cfg, model, routers = _colocated_model()
    tok = ByteTokenizer()
    with torch.no_grad():
        tokens = [_masked_greedy(model, tok.tokenize(p), NEW, None, routers) for p in PROMPTS]
    tag = ckpt.tag_for(1)
    state = model.state_dict()
    os.makedirs(os.path.join(ckpt_dir, tag))
    torch.save({"module": state}, os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"))
    _commit(ckpt_dir, tag, ckpt.checkpoint_metadata(cfg, iteration=1, consumed_samples=0, data_parallel_size=1))

    expert = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.(.+)$")
    os.makedirs(os.path.join(ma_dir, tag, ckpt.EXPERTS_DIR))
    torch.save({"module": {k: v for k, v in state.items() if not expert.match(k)}},
               os.path.join(ma_dir, tag, "mp_rank_00_model_states.pt"))
    manifest = ckpt.expert_manifest(compute_layout(4, attention_expert_ratio=(1, 1), num_attention_heads=4,
                                                   num_experts=16), 16)
    for entry in manifest["expert_ranks"]:  # each expert rank's ExpertStack: layers.L.local_experts.e.*
        first = entry["experts"][0]
        stack = {f"layers.{m[1]}.local_experts.{int(m[2]) - first}.{m[3]}": v for k, v in state.items()
                 if (m := expert.match(k)) and int(m[2]) in entry["experts"]}
        torch.save({"module": stack}, os.path.join(ma_dir, tag, ckpt.EXPERTS_DIR, entry["file"]))
    with open(os.path.join(ma_dir, tag, ckpt.EXPERTS_DIR, ckpt.MANIFEST), "w") as f:
        json.dump(manifest, f)
    _commit(ma_dir, tag, ckpt.checkpoint_metadata(load_run_config(MA), iteration=1, consumed_samples=0,
                                                  data_parallel_size=2))
    return tokens


def _degraded_reference_body(rank, world, ckpt_dir, masked_from):
    from megatron_fapool.data import ByteTokenizer

    state = torch.load(os.path.join(ckpt_dir, "iter_0000001", "mp_rank_00_model_states.pt"),
                       weights_only=False)["module"]
    _, model, routers = _colocated_model(state)
    tok = ByteTokenizer()
    with torch.no_grad():
        return [_masked_greedy(model, tok.tokenize(p), DEGRADED_NEW, d, routers) for p, d in zip(PROMPTS, masked_from)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d, ma = tmp_path_factory.mktemp("moe_ckpt"), tmp_path_factory.mktemp("moe_ma_ckpt")
    tokens = run_distributed(_write_checkpoint_body, 1, str(d), str(ma), timeout=180)[0]
    return {"dir": str(d), "ma_dir": str(ma), "tokens": tokens}


def _prompt_args(new):
    return [a for p in PROMPTS for a in ("--prompt", p)] + ["--max-new-tokens", str(new)]


def _torchrun(world, cfg, args, metrics):
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", str(world),
           "--master_port", str(find_free_port()), INFER, "--deepspeed_config", cfg, *args,
           "--metrics-json", str(metrics)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc, json.loads(metrics.read_text())


def _tokens(metrics):
    return [r["tokens"] for r in metrics["workloads"][0]["requests"]]


def test_colocated_replicas_and_ma_3_plus_1_serve_the_reference_tokens(checkpoint, tmp_path):
    args = ["--load", checkpoint["dir"], *_prompt_args(NEW)]
    _, colocated = _torchrun(2, COLOCATED, args, tmp_path / "colocated.json")
    assert colocated["data_parallel_size"] == 2 and colocated["ma_separation"] is None
    assert _tokens(colocated) == checkpoint["tokens"]

    proc, ma = _torchrun(4, MA, ["--load", checkpoint["ma_dir"], *_prompt_args(NEW)], tmp_path / "ma.json")
    assert ma["data_parallel_size"] == 3
    assert _tokens(ma) == checkpoint["tokens"]  # mixed lengths, 3 replicas, experts remote
    m = ma["ma_separation"]
    assert m["lost_ranks"] == [] and m["rerouted_tokens"] == 0
    (expert,) = m["experts"]
    assert expert["rank"] == 3 and expert["experts"] == [0, 15]
    # every token of every prefill and decode step went through the expert rank, top-2 rows each
    lens = [r["prompt_len"] for r in ma["workloads"][0]["requests"]]
    assert [r["kv_tokens_on_base"] for r in ma["workloads"][0]["requests"]] == [2 * (n + NEW - 1) for n in lens]
    per_layer = 2 * (sum(lens) + len(lens) * (NEW - 1))
    assert [sum(row) for row in expert["tokens_forward"]] == [per_layer, per_layer]
    attention = m["attention"]
    assert sum(a["rows_sent"] for a in attention) == 2 * per_layer
    # lockstep: one expert call per layer and step, for all three replicas at once; the replica with
    # fewer requests ran idle steps (5 requests over 3 replicas: 2 + 2 + 1)
    steps = {a["steps"] for a in attention}
    assert len(steps) == 1 and expert["forward_calls"] == 2 * min(steps)
    assert sorted(a["idle_steps"] for a in attention) == [0, 0, 1] and steps == {NEW + 1}
    assert "expert rank for experts 0-15: served" in proc.stdout and "== MA separation ==" in proc.stdout


def test_decode_ping_pong_serves_the_reference_tokens(checkpoint, tmp_path):
    """1 attention + 1 expert rank, micro_batches 2: each decode step of the 5 requests runs as 2
    parts taking turns (prefills, one request each, as 1); the tokens do not change."""
    data = json.load(open(MA))
    data["fapool"]["model_yaml"] = os.path.join(ROOT, "configs", "models", "tiny_moe.yaml")
    data["fapool"]["ma_separation"].update(attention_expert_ratio="1:1", micro_batches=2)
    cfg = tmp_path / "pingpong.json"
    cfg.write_text(json.dumps(data))
    _, ma = _torchrun(2, str(cfg), ["--load", checkpoint["ma_dir"], *_prompt_args(NEW)], tmp_path / "pp.json")
    assert _tokens(ma) == checkpoint["tokens"]
    (attention,) = ma["ma_separation"]["attention"]
    (expert,) = ma["ma_separation"]["experts"]
    prefills = len(PROMPTS)
    decodes = attention["steps"] - prefills
    assert decodes == NEW - 1 and expert["forward_calls"] == 2 * (prefills + 2 * decodes)  # 2 layers x parts


def _config(tmp_path, mode: str) -> str:
    data = json.load(open(MA))
    data["fapool"]["model_yaml"] = os.path.join(ROOT, "configs", "models", "tiny_moe.yaml")
    data["fapool"]["ma_separation"].update(attention_expert_ratio="1:1", on_expert_loss=mode)
    path = tmp_path / f"{mode}.json"
    path.write_text(json.dumps(data))
    return str(path)


def _run_ranks_and_kill(cfg, args, *, kill: int, pattern: str, world: int = 4, timeout: float = 400):
    """One ``launch/infer.py`` process per rank; SIGKILL rank ``kill`` once rank 0 printed ``pattern``.

    Returns (exit codes, output per rank, seconds from the kill until the last rank exited).
    """
    port = str(find_free_port())
    procs = []
    for r in range(world):
        env = dict(_env(), RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, INFER, "--deepspeed_config", cfg, *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT))
    lines = {r: [] for r in range(world)}
    killed = {}

    def read(r):
        for line in procs[r].stdout:
            lines[r].append(line)
            if r == 0 and pattern in line and not killed:
                os.kill(procs[kill].pid, signal.SIGKILL)
                killed["at"] = time.monotonic()

    readers = [threading.Thread(target=read, args=(r,), daemon=True) for r in range(world)]
    for t in readers:
        t.start()
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ended = time.monotonic()
    for t in readers:
        t.join(timeout=10)
    out = {r: "".join(lines[r]) for r in range(world)}
    assert "at" in killed, out[0][-3000:]
    return [p.returncode for p in procs], out, ended - killed["at"]


def test_degrade_survives_a_killed_expert_rank(checkpoint, tmp_path):
    metrics = tmp_path / "m.json"
    args = ["--load", checkpoint["dir"], *_prompt_args(DEGRADED_NEW), "--log-interval", "1",
            "--metrics-json", str(metrics)]
    codes, out, _ = _run_ranks_and_kill(_config(tmp_path, "degrade"), args, kill=3, pattern=KILL_AT)
    assert codes[:3] == [0, 0, 0] and codes[3] == -signal.SIGKILL, {r: o[-2000:] for r, o in out.items()}
    m = json.loads(metrics.read_text())
    ma = m["ma_separation"]
    assert ma["lost_ranks"] == [3] and ma["rerouted_tokens"] > 0
    rows = m["workloads"][0]["requests"]
    assert all(len(r["tokens"]) == DEGRADED_NEW for r in rows)  # the batch finished
    # the step left half done by the loss was undone: no layer cached a token twice
    assert [r["kv_tokens_on_base"] for r in rows] == [2 * (r["prompt_len"] + DEGRADED_NEW - 1) for r in rows]
    masked_from = [r["degraded_from"] for r in rows]
    assert all(d is not None and 3 <= d < DEGRADED_NEW for d in masked_from), masked_from  # killed mid-decode
    # before the loss: the colocated model's tokens; from it on: the colocated model with experts 8-15 masked
    # (the step the loss interrupted redone with the mask)
    reference = run_distributed(_degraded_reference_body, 1, checkpoint["dir"], masked_from, timeout=180)[0]
    assert [r["tokens"] for r in rows] == reference
    (survivor,) = ma["experts"]
    assert survivor["rank"] == 2 and survivor["lost"] == [3]
    assert "lost expert rank 3 (experts 8-15): its experts 8-15 are masked from routing" in out[0]
    assert f"{ma['rerouted_tokens']} tokens rerouted" in out[0]
    assert "went on without rank 3" in out[2]


def test_without_degrade_a_killed_expert_rank_fails_fast_naming_it(checkpoint, tmp_path):
    args = ["--load", checkpoint["dir"], *_prompt_args(DEGRADED_NEW), "--log-interval", "1"]
    codes, out, after_kill = _run_ranks_and_kill(_config(tmp_path, "fail"), args, kill=3, pattern=KILL_AT)
    assert all(c != 0 for c in codes), codes
    assert after_kill < 30, after_kill  # about 3 s to tell dead from slow, 2 s for rank 0 (the store) to leave last
    for r in (0, 1, 2):
        errors = [line for line in out[r].splitlines() if line.startswith("fapool: error:")]
        assert errors and "lost expert rank 3 (experts 8-15)" in errors[0], out[r][-3000:]
        assert "on_expert_loss is 'fail'" in errors[0]
