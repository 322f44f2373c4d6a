"""The serving transport's pure parts: header encoding, handler tables, call ids, named failures.

The collectives themselves run in every pool test (tests/attention/pool/).
"""

import gc

import pytest
import torch

from megatron_fapool.config import ATTENTION_BACKENDS
from megatron_fapool.parallel.service import (
    SHUTDOWN,
    Header,
    PeerLost,
    ServiceClient,
    TransferStats,
    merge_handlers,
    named_failure,
)


def test_header_round_trip_with_dtype_scale_and_backend():
    h = Header(op=7, call_id=12, n=749, members=3, layer=2, extra=9,
               **Header.encode(dtype=torch.bfloat16, softmax_scale=0.08838834764831845, backend="sdpa_cudnn"))
    back = Header.from_tensor(h.to_tensor("cpu"))
    assert back == h
    assert back.torch_dtype is torch.bfloat16 and back.softmax_scale == 0.08838834764831845
    assert back.backend_name == "sdpa_cudnn" and ATTENTION_BACKENDS[back.backend] == "sdpa_cudnn"
    assert Header.empty("cpu").shape == h.to_tensor("cpu").shape


def test_handler_tables_must_not_share_op_codes():
    def a(member, h):
        pass

    assert merge_handlers({1: a}, {2: a}) == {1: a, 2: a}
    with pytest.raises(ValueError, match=r"\[1\]"):
        merge_handlers({1: a}, {1: a})
    with pytest.raises(ValueError, match=str(SHUTDOWN)):
        merge_handlers({SHUTDOWN: a})


def test_call_ids_and_drop_before_follow_the_live_calls():
    client = ServiceClient(rank=0, peers=[1], control_group=None, stats=TransferStats())
    first, second = client.open_call(save=True), client.open_call(save=False)
    assert (first, second) == (1, 2) and client._drop_before() == 1  # call 1's state must stay
    client.close_call(first)
    assert client._drop_before() == 3

    class Ctx:
        pass

    ctx, third = Ctx(), client.open_call(save=True)
    client.close_when_dropped(ctx, third)
    assert client._drop_before() == third
    del ctx
    gc.collect()
    assert client._drop_before() == 4  # the autograd context went away without a backward


def test_communication_failures_name_the_peer():
    def broken():
        raise RuntimeError("Connection closed by peer\nmore")

    with pytest.raises(PeerLost, match=r"pool forward: lost contact with rank\(s\) \[3\]: Connection closed by peer$"):
        named_failure("pool forward", [3], broken)
    with pytest.raises(ValueError):  # not a communication failure: passes through unchanged
        named_failure("pool forward", [3], lambda: (_ for _ in ()).throw(ValueError("bad shape")))
