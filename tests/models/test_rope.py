"""RoPE at per-row positions (``models/rope.py``) is Megatron's ``RotaryEmbedding``, on CPU.

Megatron's own module is the reference: its forward is run on the CPU by pointing
``torch.cuda.current_device`` at the CPU inside the test only (its ``get_emb`` moves
the frequencies there on the first call). Exact equality: the same float32 operations.
"""

import dataclasses
import os
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_fapool.models.rope import PositionalRotaryEmbedding, install_rope
from megatron_fapool.testing.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny_dense_rope_pool.json")

VARIANTS = [
    dict(kv_channels=16, rotary_percent=1.0),
    dict(kv_channels=16, rotary_percent=0.5, rotary_base=500000),
    dict(kv_channels=16, rotary_percent=1.0, rotary_interleaved=True),
    dict(kv_channels=32, rotary_percent=1.0, seq_len_interpolation_factor=4.0),
]


def _megatron_on_cpu():
    return mock.patch.object(torch.cuda, "current_device", lambda: "cpu")


def _pair(kwargs):
    ours = PositionalRotaryEmbedding(**kwargs)
    megatron = RotaryEmbedding(**kwargs, use_cpu_initialization=True)
    return ours, megatron


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_without_positions_it_is_megatrons_rope(kwargs):
    ours, megatron = _pair(kwargs)
    assert torch.equal(ours.inv_freq, megatron.inv_freq)
    with _megatron_on_cpu():
        for s, offset in ((1, 0), (37, 0), (16, 5)):
            expected = megatron(s, offset)  # [s, 1, 1, d]
            got = ours(s, offset)
            assert got.shape == expected.shape and torch.equal(got, expected)
            ours.positions = torch.arange(s)[None]  # 0..s-1 given as data: the same
            assert torch.equal(ours(s, offset), expected)
            ours.positions = None


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_each_row_at_its_own_positions(kwargs):
    ours, megatron = _pair(kwargs)
    starts = [0, 3, 749, 3]
    s = 5
    ours.positions = torch.tensor(starts)[:, None] + torch.arange(s)[None]  # [b, s]
    got = ours(s)
    assert got.shape == (s, len(starts), 1, megatron.inv_freq.numel() * 2)
    with _megatron_on_cpu():
        for i, start in enumerate(starts):
            assert torch.equal(got[:, i: i + 1], megatron(s, start))


def test_positions_must_match_the_sequence():
    ours = PositionalRotaryEmbedding(kv_channels=16, rotary_percent=1.0)
    ours.positions = torch.arange(4)[None]
    with pytest.raises(ValueError, match=r"\[b, s\] with s = 5"):
        ours(5)


def test_frequencies_follow_the_device_and_stay_float32():
    rope = PositionalRotaryEmbedding(kv_channels=16, rotary_percent=1.0)
    before = rope.inv_freq.clone()
    rope.to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.float32 and torch.equal(rope.inv_freq, before)
    rope.to("meta")
    assert rope.inv_freq.device.type == "meta"


def test_install_refuses_fused_rope_and_a_second_install():
    megatron = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)
    fused = SimpleNamespace(position_embedding_type="rope", rotary_pos_emb=megatron,
                            config=SimpleNamespace(apply_rope_fusion=True))
    with pytest.raises(ValueError, match="apply_rope_fusion=False"):
        install_rope(fused)
    twice = SimpleNamespace(position_embedding_type="rope", rotary_pos_emb=PositionalRotaryEmbedding(16, 1.0))
    with pytest.raises(ValueError, match="already"):
        install_rope(twice)
    assert install_rope(SimpleNamespace(position_embedding_type="learned_absolute")) is None


def _model_body(rank, world):
    from megatron_fapool.config import load_run_config
    from megatron_fapool.models.gpt import build_gpt_model, check_runnable_here
    from megatron_fapool.testing.megatron_reference import (
        cpu_reference_shims, megatron_reference_spec, reference_gpt_model,
    )

    cfg = load_run_config(CONFIG)
    check_runnable_here(cfg)  # RoPE is no longer refused on CPU
    model = reference_gpt_model(cfg).eval()  # Megatron's GPTModel with install_rope
    built = build_gpt_model(dataclasses.replace(cfg, tensor_model_parallel_size=1), layer_spec=megatron_reference_spec())
    ours = model.rotary_pos_emb
    lm = cfg.model.language_model
    megatron = RotaryEmbedding(kv_channels=lm.hidden_size // lm.num_attention_heads, rotary_percent=1.0,
                               rotary_base=lm.rotary_base, use_cpu_initialization=True)
    seen = []
    ours.register_forward_hook(lambda module, args, out: seen.append(out))
    s, starts = 9, [0, 40]
    ids = torch.randint(0, lm.vocab_size, (2, s), generator=torch.Generator().manual_seed(0))
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    with cpu_reference_shims(), _megatron_on_cpu(), torch.no_grad():
        rows = torch.tensor(starts)[:, None] + torch.arange(s)[None]
        model(ids, rows, mask)  # the forward's position_ids reach the RoPE module
        per_row = [torch.equal(seen[-1][:, i: i + 1], megatron(s, start)) for i, start in enumerate(starts)]
        pos = torch.arange(s)[None].expand(2, s)
        installed = model(ids, pos, mask)
        model.rotary_pos_emb = megatron  # Megatron's own RoPE in the same model (the hook still feeds ours)
        original = model(ids, pos, mask)
    return {
        "built": isinstance(built.rotary_pos_emb, PositionalRotaryEmbedding),
        "reference": isinstance(ours, PositionalRotaryEmbedding),
        "per_row": per_row,
        "same_logits": torch.equal(installed, original),
    }


def test_installed_in_built_models_and_fed_by_position_ids():
    (res,) = run_distributed(_model_body, 1, timeout=240)
    assert res["built"] and res["reference"]
    assert res["per_row"] == [True, True]
    assert res["same_logits"]
