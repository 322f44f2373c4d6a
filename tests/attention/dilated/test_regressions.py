"""Regressions found through the model: a sequence shorter than every segment, GQA, several branches."""

import torch

from megatron_fapool.attention.dilated import dilated_attention
from megatron_fapool.attention.dilated.reference import dilated_attention_reference


def test_short_sequence_gqa_several_branches_matches_reference():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 100, 4, 16, generator=g)
    k = torch.randn(2, 100, 2, 16, generator=g)
    v = torch.randn(2, 100, 2, 16, generator=g)
    out = dilated_attention(q, k, v, (128, 256, 512), (1, 2, 4))
    ref = dilated_attention_reference(q.double(), k.double(), v.double(), (128, 256, 512), (1, 2, 4))
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5
