"""The router's aux and z losses under DeepSpeed gradient accumulation (training/moe_losses.py).

A colocated tiny MoE GPT (Megatron's MoELayer) in a DeepSpeed engine with 2 accumulation
steps: with ``set_aux_loss_scale(1/gas)`` before each backward, every gradient — the
router's, which carries the aux and z losses, included — equals plain autograd's gradient
of the mean over the micro-batches of (lm loss + aux + z). Without it the router's
gradient differs (the aux terms would weigh twice). The logged values are Megatron's
tracker's, averaged over micro-batches and layers.
"""

import os

import torch

from megatron_fapool.testing.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GAS = 2


def _body(rank, world_size):
    import deepspeed
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    from megatron_fapool.config import load_run_config
    from megatron_fapool.models.gpt import build_gpt_model
    from megatron_fapool.training.deepspeed_world import MegatronMPU, base_ranks_as_world
    from megatron_fapool.training.moe_losses import collect_aux_losses, set_aux_loss_scale

    parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    cfg = load_run_config(os.path.join(ROOT, "configs", "tiny_moe.json"))
    def build():
        torch.manual_seed(5)
        return build_gpt_model(cfg, moe_aux_loss_coeff=1.0, moe_z_loss_coeff=0.1)

    model, reference, wrong = build(), build(), build()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 257, (1, 65), generator=gen) for _ in range(GAS)]
    pos = torch.arange(64).unsqueeze(0)
    cpu = torch.device("cpu")

    def loss_of(m, d):
        return m(d[:, :-1], pos, None, labels=d[:, 1:]).float().mean()

    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": GAS,
                 "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_optimization": {"stage": 0},
                 "steps_per_print": 10**9}
    with base_ranks_as_world(dist.group.WORLD, 1):
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                               config=ds_config, mpu=MegatronMPU())
        for m, d in enumerate(data):
            loss = loss_of(engine, d)
            set_aux_loss_scale(1.0 / GAS, cpu)
            engine.backward(loss)
            if m < GAS - 1:
                engine.step()  # not the boundary: accumulates only
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        logged = collect_aux_losses(num_moe_layers=2, gas=GAS, dp_group=parallel_state.get_data_parallel_group())

    clear_aux_losses_tracker()
    set_aux_loss_scale(1.0, cpu)  # reference: d/dθ of mean_m(lm_m + aux_m + z_m)
    for d in data:
        loss_of(reference, d).backward()
    tracker = get_moe_layer_wise_logging_tracker()
    expected_logged = {k: float(v["values"].sum()) / GAS / 2 for k, v in tracker.items()}
    clear_aux_losses_tracker()
    for d in data:  # DeepSpeed's division of the lm loss without the aux scale
        (loss_of(wrong, d) / GAS).backward()
    clear_aux_losses_tracker()
    ref = {n: p.grad.detach() / GAS for n, p in reference.named_parameters()}
    bad = {n: p.grad.detach() for n, p in wrong.named_parameters()}
    return grads, ref, bad, logged, expected_logged


def test_aux_and_z_loss_gradients_are_scaled_like_the_lm_loss():
    grads, ref, bad, logged, expected = run_distributed(_body, 1, timeout=180)[0]
    router = [n for n in grads if "router" in n]
    assert len(router) == 2, router
    for n, g in grads.items():
        assert torch.allclose(g, ref[n], rtol=1e-5, atol=1e-8), (n, (g - ref[n]).abs().max())
    # the test can fail: without the scale the router gradients are not the reference's
    assert any(not torch.allclose(bad[n], ref[n], rtol=1e-3, atol=1e-7) for n in router)
    assert sorted(logged) == ["load_balancing_loss", "z_loss"]
    for k, v in logged.items():
        assert abs(v - expected[k]) <= 1e-6 * abs(expected[k]), (k, v, expected[k])
    assert 0.9 < logged["load_balancing_loss"] < 2.0  # the switch loss is 1 at uniform routing
