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
from ..models.rope import PositionalRotaryEmbedding
from .generate import _gather_tp
from .sampling import Sampling, next_tokens
from .slots import DecodeStep, PrefillStep, SlotAttention, SlotCache

__all__ = ["DEFAULT_BUCKETS", "ServingEngine"]

#: Batch sizes with a captured decode graph (a step of ``b`` rows replays the smallest bucket >= b).
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class ServingEngine:
    """Serve requests of one replica from ``cache``; ``attention`` is the model's :class:`SlotAttention`.

    ``max_new_tokens``: the most tokens any request may generate (the history's width).
    ``cuda_graphs``: capture the decode buckets (default: on CUDA). ``buckets``: batch sizes
    to capture (the slot count is always one). ``backend``: the config's attention backend, used
    by the packed prefill; the decode kernel is ``auto`` unless it names a slot-decode backend.
    """

    def __init__(self, model, attention: SlotAttention, cache: SlotCache, *, device, sampling: Sampling,
                 max_new_tokens: int, tp_group=None, cuda_graphs: bool | None = None, buckets=DEFAULT_BUCKETS,
                 backend: str = "auto"):
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
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError("CUDA graphs need a CUDA device")
            self._capture()

    # -- the decode forward (eager on CPU, captured per bucket on CUDA) ---------------------------
    def _decode_forward(self, b: int) -> None:
        step = self._decode_steps[b]
        ids, pos, slot, gen = self.ids[:b], self.pos[:b], self.slot[:b], self.gen[:b]
        step.lengths.copy_(pos + 1)
        step.rope = self.attention.rope_for(pos[:, None], self.model.config.params_dtype)
        self.attention.step = step
        try:
            logits = self.model(ids[:, None], pos[:, None], None)  # [b, 1, vocab / tp]
        finally:
            self.attention.step = None
        last = _gather_tp(logits[:, -1].float().contiguous(), self.tp_group)
        tokens = next_tokens(last, self.sampling, self.keys[:b], pos + 1)
        self.out[:b].copy_(tokens)
        ids.copy_(tokens)
        self.history[slot, gen] = tokens
        real = slot != self.cache.scratch
        pos.copy_(torch.where(real, pos + 1, 0))
        gen.copy_(torch.where(real, gen + 1, 0))

    def _capture(self) -> None:
        """One graph per bucket, captured with every row on the scratch slot (no request is touched)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for b in self.buckets:  # warm-up: kernels chosen, libraries initialised, outside any capture
                self._decode_forward(b)
        torch.cuda.current_stream(self.device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        with torch.no_grad():
            for b in reversed(self.buckets):  # largest first: the smaller ones reuse its memory
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._decode_forward(b)
                self.graphs[b] = graph
        for t in (self.pos, self.gen, self.ids):
            t.zero_()
        torch.cuda.synchronize(self.device)

    # -- requests ----------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self.rows)

    def admit(self, request: int, tokens: int) -> bool:
        """Reserve a slot for ``request`` (prompt + new tokens); False while none is free."""
        return self.cache.admit(request, tokens) is not None

    def generated(self, request: int) -> int:
        """Tokens ``request`` has generated so far (its first came from the prefill)."""
        return 1 + self.steps - self._joined_at[request]

    @torch.no_grad()
    def prefill(self, batch: list[tuple[int, list[int]]]) -> list[int]:
        """Prefill admitted requests ``[(request, prompt)]`` in one packed forward; they join the running
        rows. Returns each one's first token."""
        if not batch:
            return []
        if self.running + len(batch) > self.cache.slots:
            raise RuntimeError(f"{self.running} rows run and {len(batch)} join: more than the {self.cache.slots} slots")
        cap = self.cache.capacity
        lengths = [len(p) for _, p in batch]
        slots = [self.cache.slot_of[r] for r, _ in batch]
        for (r, p), n in zip(batch, lengths):
            if not 0 < n <= cap:
                raise ValueError(f"request {r}: a prompt of {n} tokens does not fit a slot of {cap}")
        dev = self.device
        ids = torch.tensor([t for _, p in batch for t in p], dtype=torch.long, device=dev)[None]
        pos = torch.cat([torch.arange(n) for n in lengths]).to(dev)
        dest = torch.cat([s * cap + torch.arange(n) for s, n in zip(slots, lengths)]).to(dev)
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
        rope = self.attention.rope_for(pos[None], self.model.config.params_dtype)
        self.attention.step = PrefillStep(dest, cu, lengths, self.backend, rope)
        try:
            logits = self.model(ids, pos[None], None)  # [1, T, vocab / tp]
        finally:
            self.attention.step = None
        last = _gather_tp(logits[0, cu[1:].long() - 1].float().contiguous(), self.tp_group)
        keys = torch.tensor([r for r, _ in batch], dtype=torch.long, device=dev)
        tokens = next_tokens(last, self.sampling, keys, torch.tensor(lengths, dtype=torch.long, device=dev))
        self.join([r for r, _ in batch], lengths, tokens)
        return tokens.tolist()

    def join(self, requests: list[int], lengths: list[int], first_tokens: torch.Tensor) -> None:
        """Admitted ``requests`` whose slots hold ``lengths`` tokens of K/V join the running rows, each with its
        first generated token (device tensor) as its next input. :meth:`prefill` ends with it; a benchmark may
        fill the slots itself and call it directly."""
        dev = self.device
        rows = torch.arange(self.running, self.running + len(requests), device=dev)
        slots = torch.tensor([self.cache.slot_of[r] for r in requests], dtype=torch.long, device=dev)
        self.ids[rows] = first_tokens.to(dev)
        self.pos[rows] = torch.tensor(lengths, dtype=torch.long, device=dev)
        self.slot[rows] = slots
        self.keys[rows] = torch.tensor(requests, dtype=torch.long, device=dev)
        self.gen[rows] = 1
        self.history[slots, 0] = first_tokens.to(dev)
        for r in requests:
            self.row_of[r] = len(self.rows)
            self.rows.append(r)
            self._joined_at[r] = self.steps

    @torch.no_grad()
    def decode(self) -> torch.Tensor:
        """One decode step of every running row; their new tokens, in row order, on the host (one sync)."""
        b = self.running
        if not b:
            raise RuntimeError("no request is running: prefill some first")
        bucket = self._bucket_of[b]
        graph = self.graphs.get(bucket)
        if graph is not None:
            graph.replay()
        else:
            self._decode_forward(bucket)
        self.steps += 1
        return self._read_tokens(b)

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
        return out

    def _remove_row(self, request: int) -> None:
        row, last = self.row_of.pop(request), len(self.rows) - 1
        if row != last:  # the last row moves into the freed one
            for t in (self.ids, self.pos, self.slot, self.keys, self.gen):
                t[row] = t[last]
            moved = self.rows[last]
            self.rows[row] = moved
            self.row_of[moved] = row
        self.rows.pop()
        self.slot[last] = self.cache.scratch
        for t in (self.ids, self.pos, self.keys, self.gen):
            t[last] = 0
