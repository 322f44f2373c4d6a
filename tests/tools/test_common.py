"""tools/_common.py: the helpers every tool shares."""

import pytest
import torch

from megatron_fapool.testing.compare import rel_err as compare_rel_err
from megatron_fapool.training.flops import dense_attention_forward_flops


@pytest.fixture
def common(load_tool):
    return load_tool("_common")


def test_rel_err_is_the_one_in_the_package(common):
    assert common.rel_err is compare_rel_err


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
