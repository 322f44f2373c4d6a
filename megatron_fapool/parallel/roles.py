"""Ranks and roles as a pure function of the configuration (DESIGN.md §1).

``world = base ranks (Megatron grid TP x PP x DP) + pool ranks + expert ranks``

* Base ranks are global ranks ``[0, num_base)`` and follow Megatron's default rank
  order ``tp-cp-ep-dp-pp``: ``rank = tp + TP * (dp + DP * pp)``.
* Pool ranks follow, ``[num_base, num_base + pool_size)``. *Dedicated* pool (the default):
  base rank ``b`` owns the ``pool_per_base`` consecutive pool ranks starting at
  ``num_base + b * pool_per_base``; an attention group with ``p`` active pool ranks is
  ``(b, first p of its pool)``. *Shared* pool (``pool_shared``): any base rank may use any
  pool rank, step by step (:mod:`megatron_fapool.attention.pool.sharing`), in aligned
  power-of-two *blocks* of the pool (:meth:`Layout.pool_blocks`: ``2^k`` ranks starting at a
  multiple of ``2^k``); an attention group is ``(b,) + block``, so there are
  ``num_base * (2 * pool_size - 1)`` of them at most (every block's first half is a block, so a
  group with fewer active ranks is one of them too), and the base and pool ranks share one
  coordination group for the per-step assignment.
* Expert ranks come last (MA separation), split evenly over the pipeline stages.

Nothing here needs ``torch.distributed``: the layout can be computed, printed and
tested for any world size. Impossible layouts raise :class:`LayoutError` with a
message that says how to fix them, before any process group is created.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

__all__ = ["Layout", "LayoutError", "RankRole", "compute_layout", "layout_from_config"]

BASE, POOL, EXPERT = "base", "pool", "expert"


class LayoutError(ValueError):
    """The requested layout cannot be built on this world."""


@dataclass(frozen=True)
class RankRole:
    rank: int
    role: str  # "base" | "pool" | "expert"
    tp: int  # Megatron coordinates; for a pool rank those of the base rank it serves
    pp: int
    dp: int
    serves: int | None = None  # pool rank: the base rank it serves
    pool_index: int | None = None  # pool rank: its index in that base rank's pool (0-based)
    expert_index: int | None = None  # expert rank: index among the expert ranks of its stage


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int
    dp: int
    pool_size: int
    num_expert: int
    num_attention_heads: int
    num_query_groups: int
    num_experts: int = 0  # MA separation: experts per MoE layer, split over each stage's expert ranks
    pool_shared: bool = False  # the pool serves every base rank (per step) instead of a fixed share each

    @property
    def num_base(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def pool_per_base(self) -> int:
        """Dedicated pool: the pool ranks each base rank owns (0 for a shared pool)."""
        return 0 if self.pool_shared else self.pool_size // self.num_base

    @property
    def has_pool(self) -> bool:
        return self.pool_size > 0

    @property
    def experts_per_stage(self) -> int:
        return self.num_expert // self.pp

    def experts_of(self, rank: int) -> range:
        """MA separation: the global expert ids an expert rank owns (Megatron's EP numbering: contiguous)."""
        role = self.role_of(rank)
        if role.role != EXPERT:
            raise ValueError(f"rank {rank} is not an expert rank")
        k = self.num_experts // self.experts_per_stage
        return range(role.expert_index * k, (role.expert_index + 1) * k)

    # --- coordinates -------------------------------------------------------------
    def base_rank(self, tp: int, dp: int, pp: int) -> int:
        return tp + self.tp * (dp + self.dp * pp)

    def base_coords(self, rank: int) -> tuple[int, int, int]:
        """(tp, dp, pp) of a base rank."""
        if not 0 <= rank < self.num_base:
            raise ValueError(f"rank {rank} is not a base rank (base ranks are 0..{self.num_base - 1})")
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    @cached_property
    def roles(self) -> tuple[RankRole, ...]:
        out = []
        for r in range(self.num_base):
            tp, dp, pp = self.base_coords(r)
            out.append(RankRole(r, BASE, tp, pp, dp))
        for i in range(self.pool_size):
            if self.pool_shared:  # serves whichever base rank the step's assignment names
                out.append(RankRole(self.num_base + i, POOL, 0, 0, 0, pool_index=i))
                continue
            served = i // self.pool_per_base
            tp, dp, pp = self.base_coords(served)
            out.append(RankRole(self.num_base + i, POOL, tp, pp, dp, serves=served, pool_index=i % self.pool_per_base))
        first_expert = self.num_base + self.pool_size
        for i in range(self.num_expert):
            pp = i // self.experts_per_stage
            out.append(RankRole(first_expert + i, EXPERT, 0, pp, 0, expert_index=i % self.experts_per_stage))
        return tuple(out)

    def role_of(self, rank: int) -> RankRole:
        return self.roles[rank]

    # --- groups --------------------------------------------------------------------
    def pool_of(self, base_rank: int) -> tuple[int, ...]:
        """Pool ranks owned by ``base_rank``, in activation order."""
        self.base_coords(base_rank)
        start = self.num_base + base_rank * self.pool_per_base
        return tuple(range(start, start + self.pool_per_base))

    def attention_group(self, base_rank: int, active: int) -> tuple[int, ...]:
        """Members of ``base_rank``'s attention group with ``active`` pool ranks (base first)."""
        if not 1 <= active <= self.pool_per_base:
            raise ValueError(f"active pool size must be in 1..{self.pool_per_base}, got {active}")
        return (base_rank,) + self.pool_of(base_rank)[:active]

    def attention_groups(self) -> list[tuple[int, ...]]:
        """Every candidate attention group, in the (deterministic) order they are created."""
        if self.pool_shared:
            return [(b,) + block for b in range(self.num_base) for block in self.pool_blocks()]
        return [
            self.attention_group(b, p)
            for b in range(self.num_base)
            for p in range(1, self.pool_per_base + 1)
        ]

    def pool_blocks(self) -> list[tuple[int, ...]]:
        """Shared pool: the aligned power-of-two blocks of pool ranks (global ranks), largest first."""
        if not self.pool_shared:
            return []
        out, size = [], 1 << (self.pool_size.bit_length() - 1)
        while size:
            out += [tuple(range(self.num_base + lo, self.num_base + lo + size))
                    for lo in range(0, self.pool_size - size + 1, size)]
            size //= 2
        return out

    def coordination_group(self) -> tuple[int, ...]:
        """Shared pool: the base and pool ranks, which agree on each step's assignment together."""
        return tuple(range(self.num_base + self.pool_size)) if self.pool_shared else ()

    def expert_group(self, pp: int) -> tuple[int, ...]:
        first = self.num_base + self.pool_size + pp * self.experts_per_stage
        return tuple(range(first, first + self.experts_per_stage))

    def dispatch_group(self, pp: int) -> tuple[int, ...]:
        """MA separation: base ranks of stage ``pp`` and that stage's expert ranks (all-to-all)."""
        base = tuple(self.base_rank(t, d, pp) for d in range(self.dp) for t in range(self.tp))
        return base + self.expert_group(pp)

    def dispatch_groups(self) -> list[tuple[int, ...]]:
        return [self.dispatch_group(s) for s in range(self.pp)] if self.num_expert else []

    # --- printing --------------------------------------------------------------------
    def describe(self) -> str:
        lines = [
            f"world {self.world_size} = {self.num_base} base (TP {self.tp} x PP {self.pp} x DP {self.dp})"
            f" + {self.pool_size} pool + {self.num_expert} expert",
            f"heads {self.num_attention_heads} ({self.num_attention_heads // self.tp} per TP rank),"
            f" query groups {self.num_query_groups}; data-parallel size seen by DeepSpeed: {self.dp}",
        ]
        for r in self.roles:
            if r.role == BASE:
                extra = f"pool {list(self.pool_of(r.rank))}" if self.pool_per_base else ""
                lines.append(f"  rank {r.rank:>3}  base    tp={r.tp} pp={r.pp} dp={r.dp}  {extra}".rstrip())
            elif r.role == POOL and self.pool_shared:
                lines.append(f"  rank {r.rank:>3}  pool    shared (pool index {r.pool_index})")
            elif r.role == POOL:
                lines.append(
                    f"  rank {r.rank:>3}  pool    serves rank {r.serves} (tp={r.tp} pp={r.pp} dp={r.dp}) slot {r.pool_index}"
                )
            else:
                ids = self.experts_of(r.rank) if self.num_experts else None
                owns = f"  experts {ids.start}-{ids.stop - 1} of every MoE layer" if ids else ""
                lines.append(f"  rank {r.rank:>3}  expert  pp={r.pp} slot {r.expert_index}{owns}")
        if self.pool_per_base:
            lines.append(
                f"attention groups: {len(self.attention_groups())} candidate groups"
                f" (1..{self.pool_per_base} active pool ranks per base rank), created at start-up"
            )
        elif self.pool_shared:
            lines.append(
                f"shared pool: {len(self.pool_blocks())} aligned blocks, {len(self.attention_groups())} attention"
                f" groups (each base rank x each block) and one coordination group, created at start-up"
            )
        if self.num_expert:
            lines.append(f"dispatch groups: {[list(g) for g in self.dispatch_groups()]}")
        return "\n".join(lines)


def compute_layout(
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    pool_size: int = 0,
    attention_expert_ratio: tuple[int, int] | None = None,
    num_attention_heads: int,
    num_query_groups: int | None = None,
    num_layers: int | None = None,
    num_experts: int | None = None,
    pool_shared: bool = False,
) -> Layout:
    """The layout of ``world_size`` ranks, or :class:`LayoutError` saying how to fix it.

    ``attention_expert_ratio=(a, e)`` enables MA separation: of the non-pool ranks,
    ``e / (a + e)`` become expert ranks.
    """
    groups = num_query_groups or num_attention_heads
    if world_size < 1:
        raise LayoutError(f"world size must be >= 1, got {world_size}")
    if tp < 1 or pp < 1:
        raise LayoutError(f"tensor/pipeline parallel sizes must be >= 1, got TP={tp} PP={pp}")
    if pool_size < 0:
        raise LayoutError(f"attention_pool.pool_size must be >= 0, got {pool_size}")
    if num_attention_heads % tp:
        raise LayoutError(
            f"num_attention_heads={num_attention_heads} is not divisible by tensor_model_parallel_size={tp}:"
            f" choose TP among {_divisors(num_attention_heads)}"
        )
    if groups % tp:
        raise LayoutError(
            f"num_query_groups={groups} is not divisible by tensor_model_parallel_size={tp}:"
            f" choose TP among {_divisors(groups)}"
        )
    if num_layers is not None and num_layers % pp:
        raise LayoutError(
            f"num_layers={num_layers} is not divisible by pipeline_model_parallel_size={pp}:"
            f" choose PP among {_divisors(num_layers)}"
        )
    non_pool = world_size - pool_size
    if non_pool < tp * pp:
        raise LayoutError(
            f"attention_pool.pool_size={pool_size} does not fit a world of {world_size} ranks:"
            f" the base grid needs TP*PP={tp * pp} ranks, so use pool_size <= {max(world_size - tp * pp, 0)}"
            f" or launch at least {tp * pp + pool_size} ranks"
        )
    num_expert = 0
    if attention_expert_ratio is not None:
        a, e = attention_expert_ratio
        if non_pool * e % (a + e):
            raise LayoutError(
                f"MA separation ratio {a}:{e} does not split {non_pool} non-pool ranks evenly:"
                f" launch a multiple of {(a + e)} non-pool ranks (e.g. {(a + e) * tp * pp})"
            )
        num_expert = non_pool * e // (a + e)
        if num_expert % pp:
            raise LayoutError(
                f"{num_expert} expert ranks cannot be split over {pp} pipeline stages: adjust the world size"
            )
        if num_experts is not None and num_experts % max(num_expert, 1):
            raise LayoutError(
                f"num_experts={num_experts} is not divisible by the {num_expert} expert ranks:"
                f" choose a world size giving an expert-rank count among {_divisors(num_experts)}"
            )
    num_base = non_pool - num_expert
    if num_base < tp * pp or num_base % (tp * pp):
        raise LayoutError(
            f"{num_base} base ranks (world {world_size} - pool {pool_size} - expert {num_expert})"
            f" are not a multiple of TP*PP={tp * pp}: launch {tp * pp} x DP + {pool_size + num_expert} ranks"
        )
    if pool_shared and not pool_size:
        raise LayoutError("a shared attention pool needs attention_pool.pool_size >= 1")
    if pool_shared and (pp > 1 or attention_expert_ratio is not None):
        raise LayoutError("a shared attention pool (attention_pool.sharing 'shared') is built for PP 1 without MA"
                          " separation yet: use sharing 'dedicated', or PP 1 and ma_separation.enabled false")
    if pool_size % num_base and not pool_shared:
        raise LayoutError(
            f"attention_pool.pool_size={pool_size} is not a multiple of the {num_base} base ranks"
            f" (each base rank gets an equal share): use pool_size in "
            f"{[num_base * k for k in range(1, 5)]} or change the world size"
        )
    return Layout(
        world_size=world_size,
        tp=tp,
        pp=pp,
        dp=num_base // (tp * pp),
        pool_size=pool_size,
        num_expert=num_expert,
        num_attention_heads=num_attention_heads,
        num_query_groups=groups,
        num_experts=num_experts if num_expert and num_experts else 0,
        pool_shared=pool_shared,
    )


def layout_from_config(run_config, world_size: int) -> Layout:
    """Layout for a :class:`~megatron_fapool.config.RunConfig` on ``world_size`` ranks."""
    lm = run_config.model.language_model
    pool = run_config.fapool.attention_pool
    ma = run_config.fapool.ma_separation
    return compute_layout(
        world_size,
        tp=run_config.tensor_model_parallel_size,
        pp=run_config.pipeline_model_parallel_size,
        pool_size=pool.pool_size if pool.enabled else 0,
        attention_expert_ratio=ma.ratio if ma.enabled else None,
        num_attention_heads=lm.num_attention_heads,
        num_query_groups=lm.query_groups,
        num_layers=lm.num_layers,
        num_experts=lm.num_moe_experts if ma.enabled else None,  # the loader resolved MA and YAML keys
        pool_shared=pool.enabled and pool.sharing == "shared",
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
