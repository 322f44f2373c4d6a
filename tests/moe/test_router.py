"""FapoolTopKRouter: Megatron's TopKRouter (bitwise, with its aux and z losses) that runs on the CPU
without Transformer Engine, and its expert mask (top-k over the surviving experts, rerouted tokens)."""

import os

import pytest
import torch

from megatron_fapool.testing.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny_moe.json")
S, B = 24, 3


def _config(dtype):
    from megatron_fapool.config import load_run_config, to_transformer_config

    lm = load_run_config(CONFIG).model.language_model.model_copy(update={"moe_z_loss_coeff": 1e-3})
    return to_transformer_config(lm, tensor_model_parallel_size=1, pipeline_model_parallel_size=1, params_dtype=dtype)


def _routers(config):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_fapool.moe import FapoolTopKRouter

    pg = get_default_pg_collection()
    torch.manual_seed(3)
    megatron = TopKRouter(config, pg_collection=pg)
    ours = FapoolTopKRouter(config, pg_collection=pg)
    ours.load_state_dict(megatron.state_dict())
    for r in (megatron, ours):
        r.set_layer_number(1)
    return megatron, ours


def _train_step(router, x, weights):
    from megatron.core.transformer.moe import moe_utils

    moe_utils.clear_aux_losses_tracker()
    router.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    probs, routing_map = router(x)
    (probs.float() * weights).sum().backward()
    tracker = {k: v["values"].clone() for k, v in moe_utils.get_moe_layer_wise_logging_tracker().items()}
    return probs.detach(), routing_map, x.grad, router.weight.grad.clone(), tracker


def _body(rank, world):
    from megatron.core import parallel_state

    from megatron_fapool.testing.megatron_reference import cpu_reference_shims

    parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    out = {}
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        config = _config(dtype)
        megatron, ours = _routers(config)
        x = torch.randn(S, B, config.hidden_size, generator=g).to(dtype)
        weights = torch.randn(S * B, config.num_moe_experts, generator=g)
        for r in (megatron, ours):
            r.train()
        ours_train = _train_step(ours, x, weights)  # no shims: ours runs on the CPU as it is
        with cpu_reference_shims():
            ref_train = _train_step(megatron, x, weights)
        out[str(dtype)] = {"ours": ours_train, "megatron": ref_train, "weight_device": ours.weight.device.type,
                           "weight_dtype": ours.weight.dtype}

    config = _config(torch.float32)
    megatron, ours = _routers(config)
    x = torch.randn(S, B, config.hidden_size, generator=g)
    for r in (megatron, ours):
        r.eval()
    with torch.no_grad(), cpu_reference_shims():
        logits = megatron.gating(x)
        unmasked_top = torch.topk(logits.view(-1, config.num_moe_experts), config.moe_router_topk, dim=-1).indices
        ours.mask_experts([3, 5])
        masked = ours(x)
        mask = torch.zeros(config.num_moe_experts, dtype=torch.bool)
        mask[[3, 5]] = True
        expected_masked = megatron.routing(logits.masked_fill(mask, float("-inf")))
        rerouted_after_one = ours.rerouted_tokens
        ours.mask_experts([7])  # added to the mask
        masked_more = ours(x)
        masked_ids = ours.masked_experts
        rerouted_after_two = ours.rerouted_tokens
        ours.unmask_all()
        clean = ours(x)
        expected_clean = megatron(x)
        rerouted_unmasked = ours.rerouted_tokens
    errors = {}
    for ids in ([16], [-1], list(range(15))):
        try:
            ours.mask_experts(ids)
        except ValueError as e:
            errors[str(ids)] = str(e)
    # masked experts in training: no token reaches them, gradients stay finite
    ours.train()
    ours.mask_experts([0, 1, 2])
    train_masked = _train_step(ours, x, torch.randn(S * B, config.num_moe_experts, generator=g))
    out["mask"] = {
        "unmasked_top": unmasked_top, "masked": masked, "expected_masked": expected_masked,
        "rerouted_after_one": rerouted_after_one, "masked_more": masked_more, "masked_ids": masked_ids,
        "rerouted_after_two": rerouted_after_two, "rerouted_unmasked": rerouted_unmasked, "clean": clean,
        "expected_clean": expected_clean, "errors": errors, "train_masked": train_masked,
    }
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_body, 1, timeout=150)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_mask_is_megatrons_router_bitwise(results, dtype):
    r = results[str(dtype)]
    ours, ref = r["ours"], r["megatron"]
    for name, a, b in zip(("probs", "routing_map", "input grad", "weight grad"), ours[:4], ref[:4]):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert set(ref[4]) == {"load_balancing_loss", "z_loss"}
    for name in ref[4]:
        assert torch.equal(ours[4][name], ref[4][name]) and ref[4][name][0] > 0, name
    # router weight in the params dtype, where it was built (no move to CUDA); probs in fp32
    assert r["weight_device"] == "cpu" and r["weight_dtype"] == dtype and ours[0].dtype == torch.float32


def test_masked_experts_get_no_tokens_and_topk_is_over_the_survivors(results):
    m = results["mask"]
    probs, routing_map = m["masked"]
    exp_probs, exp_map = m["expected_masked"]
    assert torch.equal(probs, exp_probs) and torch.equal(routing_map, exp_map)  # Megatron's routing at -inf
    assert not routing_map[:, [3, 5]].any() and (probs[:, [3, 5]] == 0).all()
    assert (routing_map.sum(dim=1) == 2).all()  # still top-2, over the 14 survivors
    assert torch.allclose(probs.sum(dim=1), torch.ones(S * B))
    # rerouted = tokens whose unmasked top-2 held expert 3 or 5 (one forward counted once)
    hit = (m["unmasked_top"][..., None] == torch.tensor([3, 5])).any(dim=-1).any(dim=-1)
    assert m["rerouted_after_one"] == int(hit.sum()) > 0
    more_probs, more_map = m["masked_more"]
    assert m["masked_ids"] == (3, 5, 7) and not more_map[:, [3, 5, 7]].any()
    hit7 = (m["unmasked_top"][..., None] == torch.tensor([3, 5, 7])).any(dim=-1).any(dim=-1)
    assert m["rerouted_after_two"] == m["rerouted_after_one"] + int(hit7.sum())


def test_unmask_all_is_megatrons_routing_again(results):
    m = results["mask"]
    for a, b in zip(m["clean"], m["expected_clean"]):
        assert torch.equal(a, b)
    assert m["rerouted_unmasked"] == m["rerouted_after_two"]  # nothing counted without a mask


def test_mask_errors_and_training_with_a_mask(results):
    m = results["mask"]
    assert "outside 0..15" in m["errors"]["[16]"] and "outside 0..15" in m["errors"]["[-1]"]
    assert "needs at least 2" in m["errors"][str(list(range(15)))]
    probs, routing_map, dx, dw, tracker = m["train_masked"]
    assert not routing_map[:, :3].any() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    assert torch.isfinite(tracker["load_balancing_loss"]).all() and torch.isfinite(tracker["z_loss"]).all()
