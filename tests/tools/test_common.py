"""tools/_common.py: the helpers every tool shares."""

import pytest
import torch

from megatron_fapool.testing.compare import rel_err as compare_rel_err
from megatron_fapool.training.flops import dense_attention_forward_flops


@pytest.fixture
def common(load_tool):
    return load_tool("_common")


def test_rel_err_is_compare_rel_err_in_chunks(common):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 50, 3, 4, generator=g)
    x = ref + 1e-3 * torch.randn(ref.shape, generator=g)
    for chunk in (1, 7, 50, 1000):
        assert common.rel_err(x, ref, chunk=chunk) == pytest.approx(compare_rel_err(x, ref), rel=1e-12)
    # the reference's non-finite entries are left out; NaN where the reference is finite is NaN
    ref[0, 3, 0, 0] = x[0, 3, 0, 0] = float("inf")
    ref[1, 40, 2, 1] = float("-inf")
    assert common.rel_err(x, ref, chunk=7) == pytest.approx(compare_rel_err(x, ref), rel=1e-12)
    x[1, 20, 0, 0] = float("nan")
    assert torch.isnan(torch.tensor(common.rel_err(x, ref, chunk=7)))
    assert common.rel_err(torch.zeros(3, 4), torch.zeros(3, 4)) == 0.0
    with pytest.raises(ValueError, match="shape mismatch"):
        common.rel_err(x, ref[:, :10])


def test_dtypes_tolerances_and_bytes(common):
    assert common.DTYPES["bf16"] is torch.bfloat16 and common.DTYPES["float32"] is torch.float32
    assert common.default_tol(torch.float16) == 2.5e-2 and common.default_tol(torch.float32) == 1e-4
    assert common.fmt_bytes(3 * 2**30) == "3.00 GiB" and common.fmt_bytes(2**20) == "1.0 MiB"
    assert common.fmt_bytes(512) == "0.5 KiB"


def test_attention_flops_counts_a_batch_of_dense_causal_attention(common):
    assert common.attention_flops(3, 4, 128, 16) == 3 * dense_attention_forward_flops(128, num_heads=4, head_dim=16)
    assert common.attention_flops(1, 1, 8, 1, causal=False) == 4 * 64


def test_timing_counts_every_repetition_after_the_warm_up(common):
    calls = []
    times = common.time_fn(lambda: calls.append(1), device=torch.device("cpu"), reps=4, warmup=2)
    assert len(times) == 4 and len(calls) == 6 and all(t >= 0 for t in times)
    assert common.median_ms(lambda: None, torch.device("cpu"), warmup=0, reps=3) >= 0
