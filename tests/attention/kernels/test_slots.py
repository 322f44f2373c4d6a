"""Slot-cache decode and packed causal prefill (:mod:`megatron_fapool.attention.kernels.slots`).

* ``slot_decode``'s torch path against a float64 reference built row by row from
  ``k_cache[slot, :len]`` (MHA and GQA, lengths 0 / 1 / cap, slots out of order and repeated,
  several dtypes, row chunking), its checks, and that it never reads a device value on the host.
* The Triton kernel on CPU tensors in Triton's interpreter (a subprocess with
  ``TRITON_INTERPRET=1``; skipped where Triton does not import, as on CI).
* ``packed_causal`` against per-prompt references on CPU.
* GPU (marker ``gpu``): the Triton kernel against the torch path at bf16/fp16/fp32, under CUDA
  graph capture and replay with new lengths and slots, and ``packed_causal``'s FA2 varlen path.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from kernel_cases import BF16_TOL, FP32_TOL
from megatron_fapool.attention.kernels import packed_causal, slot_decode
from megatron_fapool.attention.kernels import slots as slots_mod
from megatron_fapool.attention.kernels import triton_decode
from megatron_fapool.attention.kernels.reference import reference_attention
from megatron_fapool.testing.compare import assert_rel_close

TOLS = {torch.float64: 1e-12, torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL, torch.float16: BF16_TOL}

# name -> (S slots, cap, hq, hk, d, slots, lengths, softmax_scale)
DECODE_CASES = {
    "mha": (4, 37, 4, 4, 16, [2, 0, 3, 1], [37, 0, 1, 20], None),
    "gqa": (5, 50, 8, 2, 32, [4, 1, 1, 0, 3], [1, 50, 17, 0, 49], 0.3),
    "gqa3_repeat_slot": (3, 29, 6, 2, 8, [2, 2, 0], [29, 5, 28], None),
    "mqa": (2, 64, 4, 1, 64, [1, 0], [63, 64], None),
}


def make_decode_inputs(case: str, dtype=torch.float32, device="cpu", seed=0):
    s, cap, hq, hk, d, slots, lengths, scale = DECODE_CASES[case] if isinstance(case, str) else case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(slots), hq, d, generator=g, dtype=torch.float64)
    kc = torch.randn(s, cap, hk, d, generator=g, dtype=torch.float64)
    vc = torch.randn(s, cap, hk, d, generator=g, dtype=torch.float64)
    cast = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    sl = torch.tensor(slots, dtype=torch.int64, device=device)
    ln = torch.tensor(lengths, dtype=torch.int32, device=device)
    return (cast(q), cast(kc), cast(vc), sl, ln), scale


def decode_reference(q, kc, vc, slots, lengths, scale):
    """Float64 (out [B, hq, d], lse [B, hq]) from k_cache[slot, :len] one row at a time (host loop)."""
    b, hq, d = q.shape
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    lse = torch.full((b, hq), float("-inf"), dtype=torch.float64)
    for i, (s, n) in enumerate(zip(slots.tolist(), lengths.tolist())):
        if n == 0:
            continue
        k = kc[s, :n].double().cpu()[None]
        v = vc[s, :n].double().cpu()[None]
        o, l = reference_attention(q[i].double().cpu()[None, None], k, v, causal=False, softmax_scale=scale)
        out[i], lse[i] = o[0, 0], l[0, :, 0]
    return out, lse


def check_decode(out, lse, ref, dtype):
    ro, rl = ref
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_rel_close(out, ro, rel=TOLS[dtype], msg="out")
    assert_rel_close(lse, rl, rel=TOLS[dtype], msg="lse")


# --------------------------------------------------------------------------------------
# torch path
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_torch_decode_matches_reference(case, dtype):
    xs, scale = make_decode_inputs(case, dtype)
    out, lse = slot_decode(*xs, softmax_scale=scale, backend="torch")
    check_decode(out, lse, decode_reference(*xs, scale), dtype)
    empty = xs[4] == 0
    assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()


def test_torch_decode_auto_on_cpu_and_int64_lengths():
    xs, scale = make_decode_inputs("gqa")
    q, kc, vc, sl, ln = xs
    assert slots_mod.resolve_decode_backend(q, kc, vc, "auto") == "torch"
    out, lse = slot_decode(q, kc, vc, sl.int(), ln.long(), softmax_scale=scale)
    check_decode(out, lse, decode_reference(*xs, scale), torch.float32)


def test_torch_decode_chunks_rows(monkeypatch):
    xs, scale = make_decode_inputs("gqa")
    want = slot_decode(*xs, softmax_scale=scale, backend="torch")
    q, kc = xs[0], xs[1]
    monkeypatch.setattr(slots_mod, "TORCH_DECODE_CHUNK_ELEMENTS", kc.shape[1] * kc.shape[2] * kc.shape[3] * 2)
    assert slots_mod._torch_decode_rows(q.shape[0], q.shape[1], kc.shape[1], kc.shape[2], kc.shape[3]) == 2
    got = slot_decode(*xs, softmax_scale=scale, backend="torch")
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)


def test_lengths_outside_range_are_clamped():
    xs, scale = make_decode_inputs("mha")
    q, kc, vc, sl, ln = xs
    cap = kc.shape[1]
    wild = torch.tensor([cap + 5, -3, 1, 20], dtype=torch.int32)
    out, lse = slot_decode(q, kc, vc, sl, wild, softmax_scale=scale, backend="torch")
    clamped = wild.clamp(0, cap)
    check_decode(out, lse, decode_reference(q, kc, vc, sl, clamped, scale), torch.float32)


# --------------------------------------------------------------------------------------
# no host sync
# --------------------------------------------------------------------------------------

_SYNCS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
    torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
}


class NoHostSync(TorchFunctionMode):
    """Raise on every tensor method that reads a device value on the host."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNCS:
            raise AssertionError(f"host sync: {getattr(func, '__name__', func)}")
        return func(*args, **(kwargs or {}))


def test_no_host_sync_guard_catches_syncs():
    t = torch.ones(2)
    for bad in (lambda: t[0].item(), lambda: bool(t[0]), lambda: int(t[0]), lambda: float(t[0]),
                lambda: t.tolist(), lambda: t.cpu(), lambda: t.numpy()):
        with NoHostSync(), pytest.raises(AssertionError, match="host sync"):
            bad()


@pytest.mark.parametrize("case", ["mha", "gqa"])
def test_torch_decode_does_not_sync(case, monkeypatch):
    xs, scale = make_decode_inputs(case)
    monkeypatch.setattr(slots_mod, "TORCH_DECODE_CHUNK_ELEMENTS", 1)  # one row per chunk
    with NoHostSync():
        out, lse = slot_decode(*xs, softmax_scale=scale, backend="auto")
    check_decode(out, lse, decode_reference(*xs, scale), torch.float32)


# --------------------------------------------------------------------------------------
# checks, splits, tiles
# --------------------------------------------------------------------------------------


def test_decode_rejects_bad_inputs():
    xs, _ = make_decode_inputs("gqa")
    q, kc, vc, sl, ln = xs
    bad = {
        "q must be": (q[0], kc, vc, sl, ln),
        "same shape": (q, kc, vc[:, :-1], sl, ln),
        "head_dim": (q[..., :-1], kc, vc, sl, ln),
        "multiple of kv heads": (q[:, :-1], kc, vc, sl, ln),
        "dtypes differ": (q.double(), kc, vc, sl, ln),
        "slots must be": (q, kc, vc, sl[:-1], ln),
        "int32 or int64": (q, kc, vc, sl.float(), ln),
        "lengths must be": (q, kc, vc, sl, ln[:, None]),
        "k_cache must be": (q, kc[0], vc[0], sl, ln),
    }
    for match, args in bad.items():
        with pytest.raises(ValueError, match=match):
            slot_decode(*args, softmax_scale=None)
    with pytest.raises(ValueError, match="unknown slot_decode backend"):
        slot_decode(*xs, softmax_scale=None, backend="cuda")
    for s in (0, -1, 2.0, True, slots_mod.MAX_EXPLICIT_SPLITS + 1):
        with pytest.raises(ValueError, match="splits"):
            slot_decode(*xs, softmax_scale=None, splits=s)


def test_explicit_triton_reports_why_it_cannot_run():
    xs, _ = make_decode_inputs("gqa")
    q, kc, vc, sl, ln = xs
    if triton_decode.TRITON_IMPORT_ERROR is None and slots_mod._triton_interpret():
        pytest.skip("this process runs Triton's interpreter: CPU tensors are allowed")
    with pytest.raises(ValueError, match="'triton' cannot run"):
        slot_decode(*xs, softmax_scale=None, backend="triton")
    with pytest.raises(ValueError, match="'triton' cannot run"):
        slot_decode(q.double(), kc.double(), vc.double(), sl, ln, softmax_scale=None, backend="triton")


def test_decode_splits_heuristic():
    f = slots_mod.decode_splits
    sm = 132
    assert f(1, 8, 8192, sm) == min(-(-slots_mod.SPLIT_PROGRAMS_PER_SM * sm // 8), 8192 // slots_mod.MIN_KEYS_PER_SPLIT)
    assert f(1, 8, 1 << 20, sm) == -(-slots_mod.SPLIT_PROGRAMS_PER_SM * sm // 8)  # bounded by the SMs
    assert f(256, 8, 1 << 17, sm) == 1  # the batch alone fills the GPU
    assert f(1, 1, 100, sm) == 1  # short capacity: one piece
    assert f(1, 1, 1 << 30, 10**6) == slots_mod.MAX_SPLITS
    assert f(0, 8, 0, sm) >= 1
    for b in (1, 2, 3, 7, 64):
        for cap in (1, 255, 256, 257, 4096, 131072):
            assert 1 <= f(b, 4, cap, sm) <= slots_mod.MAX_SPLITS


def test_tile_configs_cover_supported_head_dims():
    for d in (16, 32, 64, 128, 256):
        for group in (1, 2, 3, 4, 8, 16, 128):
            cfg = triton_decode.tile_config(torch.bfloat16, d, group)
            f32 = triton_decode.tile_config(torch.float32, d, group)
            assert f32.block_n == max(16, cfg.block_n // 2) and f32.group_pad == cfg.group_pad
            assert cfg.use_dot == (group >= triton_decode.DOT_MIN_GROUP)
            assert cfg.group_pad >= group and cfg.group_pad & (cfg.group_pad - 1) == 0
            assert not cfg.use_dot or cfg.group_pad >= 16
            assert cfg.block_n >= 16 and cfg.block_n & (cfg.block_n - 1) == 0


# --------------------------------------------------------------------------------------
# Triton kernel in the interpreter (CPU tensors)
# --------------------------------------------------------------------------------------

# Capacity 300 > BLOCK_N (128 for d=16/32) so that full tiles, tails, empty pieces all occur.
INTERPRETER_CASES = [
    # (S, cap, hq, hk, d, slots, lengths, scale), dtypes
    ((4, 300, 2, 2, 16, [3, 0, 2, 1, 3], [300, 0, 1, 129, 256], None), (torch.float32, torch.float16, torch.bfloat16)),
    ((3, 300, 8, 2, 32, [2, 0, 1, 2], [256, 300, 0, 77], 0.2), (torch.float32, torch.float16, torch.bfloat16)),
    ((2, 150, 6, 2, 16, [1, 0], [150, 3], None), (torch.float32,)),
]
# (the interpreter's tl.dot mishandles bfloat16: bf16 runs the multiply-and-sum path only there;
# the GPU test covers bf16 on tl.dot)


def _interpreter_cases() -> None:
    """Run in a process with TRITON_INTERPRET=1: every case, both stage-1 paths (tl.dot and
    multiply-and-sum), several splits, against the reference."""
    assert slots_mod._triton_interpret() and triton_decode.TRITON_IMPORT_ERROR is None
    default = triton_decode.DOT_MIN_GROUP
    try:
        for dot_min_group in (1, 1 << 30):  # every group on tl.dot / none
            triton_decode.DOT_MIN_GROUP = dot_min_group
            triton_decode.tile_config.cache_clear()
            for case, dtypes in INTERPRETER_CASES:
                for dtype in dtypes:
                    if dtype == torch.bfloat16 and dot_min_group == 1:
                        continue  # the interpreter's tl.dot mishandles bfloat16
                    xs, scale = make_decode_inputs(case, dtype)
                    ref = decode_reference(*xs, scale)
                    for splits in (1, 3, None):
                        out, lse = slot_decode(*xs, softmax_scale=scale, backend="triton", splits=splits)
                        try:
                            check_decode(out, lse, ref, dtype)
                        except AssertionError as exc:
                            raise AssertionError(
                                f"case {case} dtype {dtype} splits {splits} dot_min_group {dot_min_group}: {exc}"
                            ) from exc
    finally:
        triton_decode.DOT_MIN_GROUP = default
        triton_decode.tile_config.cache_clear()
    print("INTERPRETER OK")


@pytest.mark.skipif(triton_decode.TRITON_IMPORT_ERROR is not None, reason="triton is not importable")
def test_triton_kernel_in_interpreter():
    if slots_mod._triton_interpret():
        _interpreter_cases()
        return
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_slots; test_slots._interpreter_cases()"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=280)
    assert res.returncode == 0 and "INTERPRETER OK" in res.stdout, res.stdout[-3000:] + res.stderr[-6000:]


# --------------------------------------------------------------------------------------
# packed_causal
# --------------------------------------------------------------------------------------


def _packed_inputs(lengths, hq, hk, d, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=torch.float64).to(dtype) for h in (hq, hk, hk))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, cu


def _packed_reference(q, k, v, lengths, scale):
    out = torch.zeros(q.shape, dtype=torch.float64)
    start = 0
    for n in lengths:
        if n:
            sl = slice(start, start + n)
            o, _ = reference_attention(q[None, sl].double(), k[None, sl].double(), v[None, sl].double(),
                                       causal=True, softmax_scale=scale)
            out[sl] = o[0]
        start += n
    return out


@pytest.mark.parametrize("backend", ["auto", "loop", "math"])
@pytest.mark.parametrize("shape", [(4, 4, 16), (8, 2, 32)])
def test_packed_causal_matches_reference(shape, backend):
    lengths = [5, 0, 1, 33, 17]
    q, k, v, cu = _packed_inputs(lengths, *shape)
    out = packed_causal(q, k, v, cu, max_len=max(lengths), lengths=lengths, softmax_scale=0.25, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_rel_close(out, _packed_reference(q, k, v, lengths, 0.25), rel=FP32_TOL)


def test_packed_causal_bf16_and_checks():
    lengths = [7, 12]
    q, k, v, cu = _packed_inputs(lengths, 4, 2, 16, torch.bfloat16)
    out = packed_causal(q, k, v, cu, max_len=12, lengths=lengths, softmax_scale=None)
    assert out.dtype == torch.bfloat16
    assert_rel_close(out, _packed_reference(q, k, v, lengths, None), rel=BF16_TOL)
    with pytest.raises(ValueError, match="sum"):
        packed_causal(q, k, v, cu, max_len=12, lengths=[7, 11], softmax_scale=None)
    with pytest.raises(ValueError, match="max_len"):
        packed_causal(q, k, v, cu, max_len=13, lengths=lengths, softmax_scale=None)
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_causal(q, k, v, cu[:-1], max_len=12, lengths=lengths, softmax_scale=None)
    with pytest.raises(ValueError, match="int32"):
        packed_causal(q, k, v, cu.long(), max_len=12, lengths=lengths, softmax_scale=None)
    with pytest.raises(ValueError, match="aten_varlen"):
        packed_causal(q, k, v, cu, max_len=12, lengths=lengths, softmax_scale=None, backend="aten_varlen")
    with pytest.raises(ValueError, match="unknown packed_causal backend"):
        packed_causal(q, k, v, cu, max_len=12, lengths=lengths, softmax_scale=None, backend="nope")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        packed_causal(q[:, :3], k, v, cu, max_len=12, lengths=lengths, softmax_scale=None)


# --------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------

GPU_DECODE_CASES = {
    # (S, cap, hq, hk, d, slots, lengths, scale)
    "gqa_d128": (6, 1000, 32, 8, 128, [5, 0, 3, 2], [1000, 0, 517, 1], None),
    "mha_d64": (3, 777, 8, 8, 64, [2, 1, 0], [777, 300, 64], None),
    "gqa_d256": (2, 640, 8, 2, 256, [1, 0], [640, 129], 0.05),
    "mqa_group16_d128": (2, 513, 16, 1, 128, [0, 1], [513, 200], None),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", list(GPU_DECODE_CASES))
def test_gpu_triton_matches_torch(case, dtype):
    xs, scale = make_decode_inputs(GPU_DECODE_CASES[case], dtype, device="cuda")
    assert slots_mod.resolve_decode_backend(*xs[:3]) == "triton"
    ref = decode_reference(*xs, scale)
    want = slot_decode(*xs, softmax_scale=scale, backend="torch")
    check_decode(*want, ref, dtype)
    for splits in (None, 1, 3, 16):
        out, lse = slot_decode(*xs, softmax_scale=scale, backend="triton", splits=splits)
        check_decode(out, lse, ref, dtype)
        assert_rel_close(out, want[0], rel=TOLS[dtype], msg=f"out vs torch, splits={splits}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_decode_graph_capture_and_replay(backend):
    xs, scale = make_decode_inputs(GPU_DECODE_CASES["gqa_d128"], torch.bfloat16, device="cuda")
    q, kc, vc, sl, ln = xs
    static = [x.clone() for x in (q, sl, ln)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            slot_decode(static[0], kc, vc, static[1], static[2], softmax_scale=scale, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = slot_decode(static[0], kc, vc, static[1], static[2], softmax_scale=scale, backend=backend)
    for new_slots, new_lengths in (([5, 0, 3, 2], [1000, 0, 517, 1]), ([1, 1, 4, 0], [3, 999, 0, 640])):
        static[1].copy_(torch.tensor(new_slots, device="cuda"))
        static[2].copy_(torch.tensor(new_lengths, device="cuda", dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        check_decode(out, lse, decode_reference(static[0], kc, vc, static[1], static[2], scale), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_packed_causal_varlen(dtype):
    lengths = [300, 1, 0, 1025, 64]
    q, k, v, cu = (x.cuda() for x in _packed_inputs(lengths, 8, 2, 128, dtype))
    out = packed_causal(q, k, v, cu, max_len=1025, lengths=lengths, softmax_scale=None)
    loop = packed_causal(q, k, v, cu, max_len=1025, lengths=lengths, softmax_scale=None, backend="loop")
    ref = _packed_reference(q.cpu(), k.cpu(), v.cpu(), lengths, None)
    assert_rel_close(out, ref, rel=BF16_TOL, msg="aten_varlen")
    assert_rel_close(loop, ref, rel=BF16_TOL, msg="loop")
