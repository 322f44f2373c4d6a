"""MA separation training, expert side: a DeepSpeed engine over an expert rank's experts.

An expert rank holds :class:`~megatron_fapool.moe.serve.ExpertStack` (Megatron's
``SequentialMLP`` per MoE layer, its ``k`` global experts) and serves the attention
ranks' forward and backward calls (:class:`~megatron_fapool.moe.serve.ExpertServer`).
Here it also owns the optimisation of those experts, with the *same* DeepSpeed JSON as
the attention ranks (optimizer, LR schedule, ZeRO 0-2, fp32/bf16, gradient clipping),
in its own engine:

* **World.** The engine's world is the stage's expert group
  (:func:`~.deepspeed_world.role_ranks_as_world`: expert ranks are not a prefix of the
  world, so world ranks are translated too), its ``mpu`` an
  :class:`~.deepspeed_world.ExpertMPU` (data parallel = this rank alone; model parallel
  = the expert group, so every expert rank's gradient norm counts; every expert
  parameter is marked ``model_parallel`` for DeepSpeed's norm, as each exists once).
* **Batch geometry.** ``train_micro_batch_size_per_gpu`` and
  ``gradient_accumulation_steps`` as the attention ranks resolve them, at data-parallel
  size 1, and ``managed_gradient_accumulation: false`` (DeepSpeed 0.19.8; ZeRO's
  ``overlap_comm`` off below stage 2, which that mode requires): an expert
  rank runs many backward pieces per step (one per MoE layer and micro-batch), its
  ``backward()`` only accumulates and ``step()`` is the boundary. DeepSpeed's monitors
  are off here (the attention ranks write the job's numbers).
* **Backward** of one served call: ``engine.backward((y * g).sum(), scale_wrt_gas=False)``
  — the parameter and input gradients of ``y.backward(g)`` exactly, with DeepSpeed's
  backward epilogue (gradient hooks, ZeRO-2 reduction into its partitions). ``g`` comes
  from the attention ranks' loss, which DeepSpeed already divided by the accumulation
  steps, so nothing is divided again.
* **1/DP scaling.** An expert's gradient is the sum over the ``DP`` attention replicas
  whose tokens it served; colocated, DeepSpeed averages each replica's expert gradient
  over DP. A hook on every expert parameter divides by ``DP`` (Megatron's
  ``expert_gradient_scaling_factor`` does the same), so both give the same update.
* **Step** (``STEP`` op, sent by every attention rank in the iteration's last
  micro-batch, right before their own boundary ``engine.step()``): the expert engine
  steps; its gradient norm is combined with the attention ranks' into one global norm
  (:mod:`.global_norm`), so both engines clip by the same coefficient. Same JSON, same
  number of steps: the same LR schedule.
* **Save** (``SAVE`` op): the expert engine's files under the attention ranks' tag,
  ``<save>/<tag>/experts/mp_rank_<j>_...``, inside their all-or-nothing commit
  (:func:`.checkpoint.save_checkpoint`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..moe.serve import megatron_expert_name
from ..parallel.service import Header
from . import checkpoint as ckpt
from .deepspeed_world import ExpertMPU, role_ranks_as_world
from .global_norm import install_global_grad_norm

__all__ = [
    "SAVE", "STEP", "TRAINING_OPS", "ExpertTrainer", "expert_engine_config", "receive_expert_weights",
    "send_expert_weights",
]

#: Training's operations on expert ranks (MA ops 9, 10 are the MoE forward/backward).
STEP = 11
SAVE = 12
TRAINING_OPS = {"STEP": STEP, "SAVE": SAVE}

# DeepSpeed monitors: the attention ranks' engine writes the job's numbers
_MONITORS = ("tensorboard", "csv_monitor", "wandb", "comet", "monitor_config")


def expert_engine_config(ds: dict, *, micro: int, gas: int) -> dict:
    """The attention ranks' DeepSpeed JSON for an expert rank's engine (see the module doc)."""
    cfg = copy.deepcopy(ds)
    cfg.pop("train_batch_size", None)
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = gas
    cfg["managed_gradient_accumulation"] = False
    zero = cfg.get("zero_optimization") or {}
    if zero.get("overlap_comm") and zero.get("stage", 0) != 2:
        # DeepSpeed 0.19.8 allows overlap_comm without managed accumulation at stage 2 only; at data
        # parallel 1 there is no communication to overlap anyway
        cfg["zero_optimization"] = dict(zero, overlap_comm=False)
    for key in _MONITORS:
        cfg.pop(key, None)
    return cfg


@dataclass
class ExpertTrainingStats:
    steps: int = 0
    backward_pieces: int = 0
    checkpoints: int = 0


class ExpertTrainer:
    """The DeepSpeed engine of one expert rank and the operations that drive it.

    Build it (inside :meth:`world`) after the stack holds its initial weights; ``handlers``
    and :meth:`backward` go to :class:`~megatron_fapool.moe.serve.ExpertServer`.
    """

    def __init__(self, stack, ds_config: dict, groups, device, *, micro: int, gas: int, attention_dp: int,
                 save_dir: str | None, start_iteration: int = 0):
        import deepspeed

        layout = groups.layout
        self.groups = groups
        self.stage = groups.role.pp
        self.expert_ranks = layout.expert_group(self.stage)
        self.stack = stack
        self.save_dir = save_dir
        self.iteration = start_iteration
        self.stats = ExpertTrainingStats()
        self.mpu = ExpertMPU(groups.expert, groups.expert_self)
        for p in stack.parameters():
            p.model_parallel = True  # each expert exists on one rank only: its norm counts wherever it is
        params = [p for p in stack.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(
            model=stack, model_parameters=params, config=expert_engine_config(ds_config, micro=micro, gas=gas),
            mpu=self.mpu,
        )
        if attention_dp > 1:
            scale = 1.0 / attention_dp
            for p in params:
                p.register_hook(lambda g, s=scale: g * s)
        install_global_grad_norm(self.engine, group=groups.dispatch,
                                 contributes=dist.get_rank(group=groups.expert) == 0)

    @staticmethod
    def world(groups):
        """The context every call into the engine runs in: DeepSpeed's world = the expert group."""
        return role_ranks_as_world(groups.expert, groups.layout.expert_group(groups.role.pp))

    # ---- what ExpertServer calls ----

    def backward(self, y: torch.Tensor, grad: torch.Tensor) -> None:
        """The backward of one served call (see the module doc)."""
        if not y.requires_grad:
            return
        self.engine.backward((y * grad.to(y.dtype)).sum(), scale_wrt_gas=False)
        self.stats.backward_pieces += 1

    def handlers(self) -> dict:
        return {STEP: self._step, SAVE: self._save}

    def _expect(self, h: Header, what: str) -> int:
        iteration = int(h.call_id)
        if what == "step" and iteration != self.iteration + 1:
            raise RuntimeError(f"expert rank {self.groups.rank}: the attention ranks step iteration {iteration},"
                               f" this rank is at iteration {self.iteration}")
        if what == "save" and iteration != self.iteration:
            raise RuntimeError(f"expert rank {self.groups.rank}: asked to save iteration {iteration}, this rank is"
                               f" at iteration {self.iteration}")
        return iteration

    def _step(self, server, h: Header) -> None:
        self.iteration = self._expect(h, "step")
        self.engine.step()
        self.stats.steps += 1

    def _save(self, server, h: Header) -> None:
        iteration = self._expect(h, "save")
        if not self.save_dir:
            raise RuntimeError(f"expert rank {self.groups.rank}: asked to save, but --save was not given here")
        ckpt.save_expert_checkpoint(
            self.engine, self.save_dir, iteration, group=self.groups.dispatch,
            client_state={"iteration": iteration, "expert_ids": list(self.stack.global_ids)},
        )
        self.stats.checkpoints += 1

    # ---- resume ----

    def load(self, load_dir: str, tag: str) -> int:
        """Load this rank's experts of checkpoint ``tag``; returns its iteration."""
        state = ckpt.load_expert_checkpoint(self.engine, load_dir, tag, expert_ids=list(self.stack.global_ids),
                                            rank=self.groups.rank)
        self.iteration = int(state["iteration"])
        return self.iteration

    def learning_rate(self) -> float:
        return float(self.engine.get_lr()[0])


# ---- initial weights: the colocated model's experts, from the first attention rank ----

def _plan(num_layers: int, num_experts: int, suffixes) -> list[tuple[int, int, str]]:
    return [(layer, e, rest) for layer in range(num_layers) for e in range(num_experts) for rest in sorted(suffixes)]


def _check_plan(plan_numel: int, count: int, group, src: int, device, *, rank: int) -> None:
    """Everyone in the dispatch group agrees on what is sent before it is (else a clear error, not garbage)."""
    t = torch.tensor([count, plan_numel], dtype=torch.int64, device=device)
    got = t.clone()
    dist.broadcast(got, src=src, group=group)
    if not torch.equal(got, t):
        raise RuntimeError(
            f"rank {rank}: the first attention rank sends {int(got[0])} expert tensors ({int(got[1])} values), this rank"
            f" expects {count} ({plan_numel}): attention and expert ranks were built from different models"
        )


def send_expert_weights(colocated, groups, geometry, device) -> None:
    """Attention ranks: broadcast the colocated model's expert weights over the dispatch group
    (the first attention rank's; every attention rank built the same model from the same seed)."""
    state = dict(colocated.named_parameters())
    prefix = megatron_expert_name(0, 0, "")
    suffixes = [n[len(prefix):] for n in state if n.startswith(prefix)]
    num_layers = len({n.split(".")[2] for n in state if ".mlp.experts.local_experts." in n})
    plan = _plan(num_layers, geometry.num_experts, suffixes)
    numel = sum(state[megatron_expert_name(*p)].numel() for p in plan)
    src = geometry.attention_ranks[0]
    _check_plan(numel, len(plan), groups.dispatch, src, device, rank=groups.rank)
    for p in plan:
        t = state[megatron_expert_name(*p)].detach().to(device).contiguous().clone()
        dist.broadcast(t, src=src, group=groups.dispatch)


def receive_expert_weights(stack, groups, geometry, device) -> None:
    """Expert ranks: the other end of :func:`send_expert_weights`; this rank's experts go into ``stack``."""
    local = stack.layers[0].local_experts[0] if len(stack.layers) else None
    shapes = {n: p.shape for n, p in local.named_parameters()} if local is not None else {}
    dtype = next(stack.parameters()).dtype
    plan = _plan(len(stack.layers), geometry.num_experts, shapes)
    numel = sum(torch.Size(shapes[rest]).numel() for _, _, rest in plan)
    src = geometry.attention_ranks[0]
    _check_plan(numel, len(plan), groups.dispatch, src, device, rank=groups.rank)
    own = set(stack.global_ids)
    state = {}
    for layer, e, rest in plan:
        t = torch.empty(shapes[rest], dtype=dtype, device=device)
        dist.broadcast(t, src=src, group=groups.dispatch)
        if e in own:
            state[megatron_expert_name(layer, e, rest)] = t
    stack.load_from_megatron(state)
