"""The slot-serving engine: batched packed prefill, a decode step with no per-request host work, CUDA graphs.

:class:`ServingEngine` serves one model replica (this rank's TP shard of it, PP 1) from a
:class:`~.slots.SlotCache`. Requests *join* the running batch after their prefill and
*leave* when done; between those events nothing about a request is touched on the host:

* **Persistent step buffers** (one row per slot): the row's input token, position, slot,
  request key (for sampling) and the index of its next generated token. Rows ``0..b-1``
  are the running requests; rows from ``b`` up are padding pointed at the scratch slot.
* **One decode forward** over a bucket of ``B >= b`` rows: embedding -> layers (each
  appending the row's k, v at ``(slot, position)`` and attending its slot by the batched
  slot kernel) -> logits -> next token (greedy or sampled on the device,
  :mod:`.sampling`) -> the token is written back as the row's next input and into the
  slot's token history, positions advance. On CUDA each bucket's forward is captured once
  as a CUDA graph (all rows on the scratch slot, so capture touches no request) and
  replayed; on CPU the same function runs eagerly.
* **One host synchronisation per step**: the ``b`` new tokens copied to a host buffer
  (the scheduler needs them for stop tokens and timing). Python work per step does not
  depend on ``b``: no per-row lists are built, no tensors created from Python values.
* **Prefill** of several prompts in one forward, packed along the sequence (causal within
  each prompt, :class:`~.slots.PrefillStep`), their K/V written into their slots; eager
  (prompt lengths vary).

Joining writes the new rows' buffers; leaving moves the last row into the freed row
(a few device copies), so the running rows stay ``0..b-1``. Both cost O(1) host work per
request, once.
"""

from __future__ import annotations

import torch

from ..attention.kernels.slots import DECODE_BACKENDS
from ..attention.pool.mailbox import MailboxClient
from ..attention.pool.slot_kv import MEMBERS, POSITION, PROMPT, SLOT, PooledSlots, decode_rows
from ..models.rope import PositionalRotaryEmbedding
from .logits import gather_vocab
from .sampling import Sampling, next_tokens
from .slots import DecodeStep, PooledDecodeStep, PooledPrefillStep, PrefillStep, SlotAttention, SlotCache

__all__ = ["DEFAULT_BUCKETS", "ServingEngine"]

#: Batch sizes with a captured decode graph (a step of ``b`` rows replays the smallest bucket >= b).
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class ServingEngine:
    """Serve requests of one replica from ``cache``; ``attention`` is the model's :class:`SlotAttention`.

    ``max_new_tokens``: the most tokens any request may generate (the history's width).
    ``cuda_graphs``: capture the decode buckets (default: on CUDA). ``buckets``: batch sizes
    to capture (the slot count is always one). ``backend``: the config's attention backend, used
    by the packed prefill; the decode kernel is ``auto`` unless it names a slot-decode backend.

    ``pool`` (this base rank's :class:`~megatron_fapool.attention.pool.AttentionPool`): prompts the
    pool's resource manager sends to the pool are prefilled through it, one per forward, and their
    K/V is spread over the slot ``s`` of the base and of its pool ranks (each allocates a cache of
    this one's shape); decode steps with such rows exchange with the pool in every layer
    (:class:`~.slots.PooledDecodeStep`). Steps without pooled rows run as without a pool.
    ``pool_graphs``: capture the pooled steps too (their exchange inside the graph: NCCL only;
    default off, eager). ``pool`` may instead be a shared pool's
    :class:`~megatron_fapool.attention.pool.mailbox.MailboxClient` (several replicas, one pool): a long
    request is then placed on pool ranks when it is admitted (it waits while the pool has no room),
    its K/V goes to slots the pool's ledger chose (``pool_slots`` per pool rank), and every exchange
    is pairwise and eager.
    """

    def __init__(self, model, attention: SlotAttention, cache: SlotCache, *, device, sampling: Sampling,
                 max_new_tokens: int, tp_group=None, cuda_graphs: bool | None = None, buckets=DEFAULT_BUCKETS,
                 backend: str = "auto", pool=None, pool_graphs: bool = False, pool_slots: int = 0):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model.eval()
        self.attention = attention
        if any(getattr(m, "attend", attention) is not attention for m in model.modules() if hasattr(m, "attend")):
            raise ValueError("every layer's core attention must be the given SlotAttention (build the model from"
                             " layer_spec_for(..., wrap=...) returning it)")
        rope = getattr(model, "rotary_pos_emb", None)
        if attention.rope is None and isinstance(rope, PositionalRotaryEmbedding):
            attention.take_rope(rope)  # cos/sin once per forward, RoPE fused with the K/V append
        attention.cache = cache
        self.cache = cache
        self.device = torch.device(device)
        self.sampling = sampling
        self.tp_group = tp_group
        self.backend = backend  # the prefill's kernel (the config's attention backend)
        # the decode kernel reads the slot cache: the config's backend if it names one of them, else auto
        decode_backend = backend if backend in DECODE_BACKENDS else "auto"
        self.max_new_tokens = max_new_tokens
        rows = cache.slots
        long = dict(dtype=torch.long, device=self.device)
        self.ids = torch.zeros(rows, **long)  # the row's next input token
        self.pos = torch.zeros(rows, **long)  # its position
        self.slot = torch.full((rows,), cache.scratch, **long)
        self.keys = torch.zeros(rows, **long)  # request key of the row (sampling noise)
        self.gen = torch.zeros(rows, **long)  # index of the row's next generated token in its slot's history
        self.out = torch.zeros(rows, **long)  # the step's new tokens
        self.history = torch.zeros((cache.slots + 1, max_new_tokens), **long)  # generated tokens per slot
        self.host_tokens = torch.zeros(rows, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self.rows: list[int] = []  # request of each running row
        self.row_of: dict[int, int] = {}
        self._joined_at: dict[int, int] = {}  # request -> decode steps done when it joined
        self.steps = 0  # decode steps run
        self.buckets = sorted({b for b in buckets if b < rows} | {rows})
        self._bucket_of = [next(b for b in self.buckets if b >= n) for n in range(rows + 1)]
        self._decode_steps = {b: DecodeStep(self.slot[:b], self.pos[:b], torch.zeros(b, dtype=torch.int32,
                                                                                    device=self.device),
                                          decode_backend)
                              for b in self.buckets}
        self.shared = isinstance(pool, MailboxClient)  # a shared pool (serving ranks of several replicas)
        self.pool = pool if self.shared or (pool is not None and pool.client.pool_ranks) else None
        self.pooled = None  # the pool's end of the slot K/V: PooledSlots, or the MailboxClient itself
        self._members: dict[int, int] = {}  # request -> ranks holding its K/V (1: this one only)
        self.pooled_running = 0  # running rows of pooled requests
        self._tokens: dict[int, int] = {}  # request -> prompt + new tokens it was admitted with
        if self.pool is not None:
            if self.shared:
                self.pooled = pool
                pool.init(cache, pool_slots=pool_slots or cache.slots)
                # each row's pool ranks and slots there (-1: none), for the pool ranks' row tables
                self.pool_ranks = torch.full((rows, pool.members - 1), -1, **long)
                self.pool_slots = torch.full((rows, pool.members - 1), -1, **long)
            else:
                self.pooled = PooledSlots(self.pool.client, cache, dtype=cache.k[0].dtype, backend=decode_backend)
            self.table = torch.zeros((rows, 4), **long)  # the pooled steps' row table (slot_kv's columns)
            self.table[:, MEMBERS] = 1
            self._pooled_steps = {b: PooledDecodeStep(self.table[:b], self.pooled, decode_backend)
                                  for b in self.buckets}
            core = next(m for m in model.modules() if getattr(m, "attend", None) is attention)
            self._heads, self._scale = core.num_heads, core.softmax_scale
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pooled_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if pool_graphs and not (self.cuda_graphs and self.pool is not None and not self.shared):
            raise ValueError("pool_graphs needs CUDA graphs and a dedicated pool (a shared pool's exchanges are eager)")
        if self.cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError("CUDA graphs need a CUDA device")
            self._capture(pooled=False)
            if pool_graphs:
                self._capture(pooled=True)

    # -- the decode forward (eager on CPU, captured per bucket on CUDA) ---------------------------
    def _decode_forward(self, b: int, pooled: bool = False) -> None:
        ids, pos, slot, gen = self.ids[:b], self.pos[:b], self.slot[:b], self.gen[:b]
        if pooled:  # the row table was filled and announced to the pool (decode)
            step = self._pooled_steps[b]
            step.rows = decode_rows(0, step.table, self.cache.scratch)
        else:
            step = self._decode_steps[b]
            step.lengths.copy_(pos + 1)
        step.rope = self.attention.rope_for(pos[:, None], self.model.config.params_dtype)
        self.attention.step = step
        try:
            logits = self.model(ids[:, None], pos[:, None], None)  # [b, 1, vocab / tp]
        finally:
            self.attention.step = None
        last = gather_vocab(logits[:, -1].float().contiguous(), self.tp_group)
        tokens = next_tokens(last, self.sampling, self.keys[:b], pos + 1)
        self.out[:b].copy_(tokens)
        ids.copy_(tokens)
        self.history[slot, gen] = tokens
        real = slot != self.cache.scratch
        pos.copy_(torch.where(real, pos + 1, 0))
        gen.copy_(torch.where(real, gen + 1, 0))

    def _capture(self, pooled: bool) -> None:
        """One graph per bucket, captured with every row on the scratch slot (no request is touched).

        ``pooled``: the pooled step's graphs, the exchange with the pool inside; the pool takes part in
        the warm-up (announced as a real step) but not in the capture, which records without running."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for b in self.buckets:  # warm-up: kernels chosen, libraries initialised, outside any capture
                if pooled:
                    self._announce(b)
                self._decode_forward(b, pooled)
        torch.cuda.current_stream(self.device).wait_stream(side)
        mempool = torch.cuda.graph_pool_handle()
        graphs = self.pooled_graphs if pooled else self.graphs
        with torch.no_grad():
            for b in reversed(self.buckets):  # largest first: the smaller ones reuse its memory
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=mempool):
                    self._decode_forward(b, pooled)
                graphs[b] = graph
        for t in (self.pos, self.gen, self.ids):
            t.zero_()
        torch.cuda.synchronize(self.device)

    # -- requests ----------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self.rows)

    def check_fits(self, request: int, tokens: int) -> None:
        """Raise :class:`~.slots.SlotError` if ``tokens`` (prompt + new) can never fit (with a pool: the slots of
        the base and its pool ranks)."""
        self.cache.check_fits(request, tokens, self.pooled.members if self.pooled is not None else 1)

    def admit(self, request: int, tokens: int, prompt_len: int = 0) -> bool:
        """Reserve a slot for ``request`` (prompt + new tokens); False while none is free. With a pool, a request
        longer than a slot fits if it fits the slots of the base and its pool ranks (it is then pooled). A shared
        pool places a long one (prompt over the threshold, or more than a slot) when it is admitted: it waits
        (False) while the pool has no room for it."""
        members = self.pooled.members if self.pooled is not None else 1
        if self.cache.admit(request, tokens, members) is None:
            return False
        if self.shared and (prompt_len > self.pooled.threshold or tokens > self.cache.capacity):
            placement = self.pooled.admit(request, tokens, prompt_len)
            if placement is None:
                self.cache.release(request)
                return False
            self._members[request] = len(placement) + 1
        self._tokens[request] = tokens
        return True

    def generated(self, request: int) -> int:
        """Tokens ``request`` has generated so far (its first came from the prefill)."""
        return 1 + self.steps - self._joined_at[request]

    def members(self, request: int) -> int:
        """Ranks holding ``request``'s K/V: 1 (this one) or the base and its pool ranks (pooled)."""
        return self._members.get(request, 1)

    def _members_for(self, request: int, n: int) -> int:
        """Ranks for a prompt of ``n`` tokens: the pool's resource manager decides, raised to what the request's
        admitted tokens need (a shared pool placed it at admission)."""
        if self.shared:
            return self._members.get(request, 1)
        active = self.pool.manager.decide(n)
        need = -(-self._tokens.get(request, n) // self.cache.capacity)
        members = max(active + 1, need)
        if members == 1:
            self.pool.stats.local_calls += 1
        return members

    @torch.no_grad()
    def prefill(self, batch: list[tuple[int, list[int]]]) -> list[int]:
        """Prefill admitted requests ``[(request, prompt)]`` (one step of the pool's resource manager); they
        join the running rows. Prompts the pool takes run one per forward through it, the others packed
        into one forward. Returns each one's first token, in order."""
        if not batch:
            return []
        if self.running + len(batch) > self.cache.slots:
            raise RuntimeError(f"{self.running} rows run and {len(batch)} join: more than the {self.cache.slots} slots")
        if self.pool is not None and not self.shared:
            self.pool.manager.new_step()
        members = [self._members_for(r, len(p)) if self.pool is not None else 1 for r, p in batch]
        cap = self.cache.capacity
        for (r, p), m in zip(batch, members):
            if r not in self.cache.slot_of:
                raise ValueError(f"request {r} was not admitted (no slot)")
            if not 0 < len(p) <= cap * m:
                raise ValueError(f"request {r}: a prompt of {len(p)} tokens does not fit {m} slot(s) of {cap}")
        first = {r: self._prefill_pooled(r, p, m) for (r, p), m in zip(batch, members) if m > 1}
        local = [(r, p) for (r, p), m in zip(batch, members) if m == 1]
        if local:
            first.update(zip([r for r, _ in local], self._prefill_packed(local)))
        return [first[r] for r, _ in batch]

    def _prefill_packed(self, batch) -> list[int]:
        lengths = [len(p) for _, p in batch]
        slots = [self.cache.slot_of[r] for r, _ in batch]
        cap, dev = self.cache.capacity, self.device
        ids = torch.tensor([t for _, p in batch for t in p], dtype=torch.long, device=dev)[None]
        pos = torch.cat([torch.arange(n) for n in lengths]).to(dev)
        dest = torch.cat([s * cap + torch.arange(n) for s, n in zip(slots, lengths)]).to(dev)
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
        rope = self.attention.rope_for(pos[None], self.model.config.params_dtype)
        logits = self._forward(PrefillStep(dest, cu, lengths, self.backend, rope), ids, pos[None])
        return self._first_tokens(logits[0, cu[1:].long() - 1], batch, lengths, [1] * len(batch))

    def _prefill_pooled(self, request: int, prompt: list[int], members: int) -> int:
        n, dev = len(prompt), self.device
        ids = torch.tensor(prompt, dtype=torch.long, device=dev)[None]
        pos = torch.arange(n, device=dev)[None]
        rope = self.attention.rope_for(pos, self.model.config.params_dtype)
        step = PooledPrefillStep(self.pooled, request, self.cache.slot_of[request], members, rope)
        with self.pooled.prefill_pass():  # one header for every layer's pooled call (dedicated pool)
            logits = self._forward(step, ids, pos)
        return self._first_tokens(logits[0, -1:], [(request, prompt)], [n], [members])[0]

    def _forward(self, step, ids, pos):
        self.attention.step = step
        try:
            return self.model(ids, pos, None)  # [1, T, vocab / tp]
        finally:
            self.attention.step = None

    def _first_tokens(self, logits, batch, lengths, members) -> list[int]:
        """The prompts' first tokens from their last rows' logits ``[n, vocab / tp]``; they join the batch."""
        last = gather_vocab(logits.float().contiguous(), self.tp_group)
        dev = self.device
        keys = torch.tensor([r for r, _ in batch], dtype=torch.long, device=dev)
        tokens = next_tokens(last, self.sampling, keys, torch.tensor(lengths, dtype=torch.long, device=dev))
        self.join([r for r, _ in batch], lengths, tokens, members)
        return tokens.tolist()

    def join(self, requests: list[int], lengths: list[int], first_tokens: torch.Tensor, members=None) -> None:
        """Admitted ``requests`` whose slots hold ``lengths`` tokens of K/V join the running rows, each with its
        first generated token (device tensor) as its next input. :meth:`prefill` ends with it; a benchmark may
        fill the slots itself and call it directly. ``members``: ranks holding each one's K/V (default 1)."""
        dev = self.device
        members = [1] * len(requests) if members is None else list(members)
        rows = torch.arange(self.running, self.running + len(requests), device=dev)
        slots = torch.tensor([self.cache.slot_of[r] for r in requests], dtype=torch.long, device=dev)
        self.ids[rows] = first_tokens.to(dev)
        self.pos[rows] = torch.tensor(lengths, dtype=torch.long, device=dev)
        self.slot[rows] = slots
        self.keys[rows] = torch.tensor(requests, dtype=torch.long, device=dev)
        self.gen[rows] = 1
        self.history[slots, 0] = first_tokens.to(dev)
        if self.pool is not None:
            self.table[rows, PROMPT] = torch.tensor(lengths, dtype=torch.long, device=dev)
            self.table[rows, MEMBERS] = torch.tensor(members, dtype=torch.long, device=dev)
        if self.shared:
            for row, r in zip(rows.tolist(), requests):
                for j, (p, s) in enumerate(self.pooled.placement.get(r, ())):
                    self.pool_ranks[row, j], self.pool_slots[row, j] = p, s
        for r, m in zip(requests, members):
            self.row_of[r] = len(self.rows)
            self.rows.append(r)
            self._joined_at[r] = self.steps
            if m > 1:
                self._members[r] = m
                self.pooled_running += 1

    @torch.no_grad()
    def decode(self) -> torch.Tensor:
        """One decode step of every running row; their new tokens, in row order, on the host (one sync)."""
        b = self.running
        if not b:
            raise RuntimeError("no request is running: prefill some first")
        bucket = self._bucket_of[b]
        pooled = self.pooled_running > 0
        if pooled:
            self._announce(bucket)
        graph = (self.pooled_graphs if pooled else self.graphs).get(bucket)
        if graph is not None:
            graph.replay()
        else:
            self._decode_forward(bucket, pooled)
        self.steps += 1
        return self._read_tokens(b)

    def _announce(self, b: int) -> None:
        """A pooled step of ``b`` rows: the row table's positions and slots brought up to date, sent to the pool."""
        self.table[:b, POSITION].copy_(self.pos[:b])
        self.table[:b, SLOT].copy_(self.slot[:b])
        placement = (self.pool_ranks[:b], self.pool_slots[:b]) if self.shared else (None, None)
        self.pooled.announce(self.table[:b], heads=self._heads, softmax_scale=self._scale, ranks=placement[0],
                             slots=placement[1])

    def _read_tokens(self, b: int) -> torch.Tensor:
        """The step's one host synchronisation: ``b`` new tokens into the host buffer."""
        host = self.host_tokens[:b]
        host.copy_(self.out[:b], non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return host

    @torch.no_grad()
    def leave(self, requests: list[int]) -> dict[int, list[int]]:
        """``requests`` leave the batch (slots freed); the tokens each generated, read in one transfer."""
        if not requests:
            return {}
        counts = [self.generated(r) for r in requests]
        slots = torch.tensor([self.cache.slot_of[r] for r in requests], device=self.device)
        rows = self.history[slots, : max(counts)].tolist()
        out = {r: row[:n] for r, row, n in zip(requests, rows, counts)}
        for r in requests:
            self._remove_row(r)
            self.cache.release(r)
            del self._joined_at[r]
            self._tokens.pop(r, None)
            if self._members.pop(r, 1) > 1:
                self.pooled_running -= 1
            if self.shared:
                self.pooled.release(r)
        return out

    def _remove_row(self, request: int) -> None:
        row, last = self.row_of.pop(request), len(self.rows) - 1
        buffers = (self.ids, self.pos, self.slot, self.keys, self.gen) + ((self.table,) if self.pool is not None else ()) \
            + ((self.pool_ranks, self.pool_slots) if self.shared else ())
        if row != last:  # the last row moves into the freed one
            for t in buffers:
                t[row] = t[last]
            moved = self.rows[last]
            self.rows[row] = moved
            self.row_of[moved] = row
        self.rows.pop()
        self.slot[last] = self.cache.scratch
        for t in (self.ids, self.pos, self.keys, self.gen):
            t[last] = 0
        if self.pool is not None:
            self.table[last] = 0
            self.table[last, MEMBERS] = 1
        if self.shared:
            self.pool_ranks[last], self.pool_slots[last] = -1, -1
