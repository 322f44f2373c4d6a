"""Generation loop: prefill every request, then decode them in batches, with TTFT / TPOT / TPS.

A prefill is one forward of one request; a decode step is one forward of one new
token for each request of a batch (each request with its own position, its own KV
cache and, above the threshold, its own pool shards). Tensor-parallel ranks run the
same loop in lockstep; their logits are gathered, so every rank picks the same tokens.
Pipeline stages pass hidden states on and the last one broadcasts the tokens. Bad
requests are refused before any work, so no cache is touched.

With MA separation the attention replicas step together (``lockstep``,
:mod:`.lockstep`): one forward each per step, idle steps for a replica with nothing
left, and a step that failed because an expert rank was lost is undone and redone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..models.rope import PositionalRotaryEmbedding
from ..moe.pingpong import run_parts
from ..parallel.service import PeerLost
from .logits import gather_vocab

__all__ = ["Generation", "Request", "RequestError", "generate", "validate_requests"]


class RequestError(ValueError):
    """A request that cannot be served (one line, names the request)."""


@dataclass
class Request:
    id: int
    prompt: list[int]
    max_new_tokens: int


@dataclass
class Generation:
    id: int
    prompt_len: int
    tokens: list[int] = field(default_factory=list)
    pooled: bool = False
    ttft_s: float = 0.0  # from the start of the batch to this request's first token
    decode_s: list[float] = field(default_factory=list)  # time of each decode step
    done_s: float = 0.0  # from the start of the batch to this request's last token
    kv_tokens_on_base: int = 0  # K/V tokens this base rank held at the end (all layers)
    degraded_from: int | None = None  # MA, degraded: index of the first token generated without a lost expert rank
    arrival_s: float = 0.0  # continuous batching: when the request arrived (ttft_s counts from here)
    refused: str | None = None  # why the request was not served (it then has no tokens)

    @property
    def tpot_s(self) -> float:
        return sum(self.decode_s) / len(self.decode_s) if self.decode_s else 0.0


def validate_requests(requests: list[Request], *, vocab_size: int, max_positions: int) -> None:
    seen = set()
    for r in requests:
        if r.id in seen:
            raise RequestError(f"request {r.id}: duplicate id")
        seen.add(r.id)
        if not r.prompt:
            raise RequestError(f"request {r.id}: empty prompt")
        if r.max_new_tokens < 1:
            raise RequestError(f"request {r.id}: max_new_tokens must be >= 1, got {r.max_new_tokens}")
        total = len(r.prompt) + r.max_new_tokens
        if total > max_positions:
            raise RequestError(
                f"request {r.id}: prompt {len(r.prompt)} + {r.max_new_tokens} new tokens = {total} exceeds the"
                f" model's max_position_embeddings {max_positions}"
            )
        bad = [t for t in r.prompt if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"request {r.id}: token id {bad[0]} outside the vocabulary [0, {vocab_size})")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _next_tokens(model, ids, positions: list[int], device, tp_group, pp_group, pick) -> list[int]:
    """One forward of ``ids`` ``[b, s]`` (row ``i`` starting at ``positions[i]``); each row's next token.

    The positions are data: ``position_ids`` ``[b, s]`` of the forward, which a RoPE
    model built by ``build_gpt_model`` uses as its RoPE positions (``models/rope.py``).
    The tokens are the same on every rank. With pipeline stages, each stage receives
    the previous stage's hidden states, runs its layers (each keeping its own KV cache)
    and passes them on; the last stage picks the tokens and broadcasts them.
    """
    b, s = ids.shape
    pos = torch.tensor(positions, device=device)[:, None] + torch.arange(s, device=device)[None]
    stages = dist.get_world_size(pp_group) if pp_group is not None else 1
    if stages == 1:
        logits = model(ids, pos, None)  # [b, s, vocab / tp]
        return _pick_rows(gather_vocab(logits[:, -1].float().contiguous(), tp_group), pick)
    ranks = dist.get_process_group_ranks(pp_group)
    stage = ranks.index(dist.get_rank())
    if stage > 0:
        hidden = torch.empty((s, b, model.config.hidden_size), dtype=model.config.params_dtype, device=device)
        dist.recv(hidden, src=ranks[stage - 1])
        model.set_input_tensor(hidden)
    out = model(ids, pos, None)  # hidden states [s, b, h], or logits [b, s, vocab / tp] on the last stage
    tokens = torch.zeros(b, dtype=torch.long, device=device)
    if stage < stages - 1:
        dist.send(out.contiguous(), dst=ranks[stage + 1])
    else:
        tokens[:] = torch.tensor(_pick_rows(gather_vocab(out[:, -1].float().contiguous(), tp_group), pick))
    dist.broadcast(tokens, src=ranks[-1], group=pp_group)
    return tokens.tolist()


def _decode_in_parts(model, session, request_ids, ids, positions, n_parts: int, device, tp_group, pick) -> list[int]:
    """One decode step of a batch as ``n_parts`` ping-pong parts, each its own session step; the rows' tokens."""
    cuts = torch.arange(len(request_ids)).tensor_split(n_parts)
    pos = torch.tensor(positions, device=device)[:, None]

    def part(rows):
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        with session.step(request_ids[lo:hi], "decode"):
            return model(ids[lo:hi], pos[lo:hi], None)[:, -1].float()

    last = torch.cat(run_parts([lambda rows=rows: part(rows) for rows in cuts], device=device), dim=0)
    return _pick_rows(gather_vocab(last.contiguous(), tp_group), pick)


def _pick_rows(logits, pick) -> list[int]:
    if pick["greedy"]:
        limit = pick["limit"]
        return (logits[:, :limit] if limit is not None else logits).argmax(dim=-1).tolist()
    return [_pick(row, **pick) for row in logits]


def _pick(logits, *, greedy: bool, temperature: float, top_k: int, generator, limit) -> int:
    if limit is not None:
        logits = logits[:limit]
    if greedy:
        return int(logits.argmax())
    scaled = logits / max(temperature, 1e-6)
    if top_k:
        kth = torch.topk(scaled, min(top_k, scaled.numel())).values[-1]
        scaled = torch.where(scaled < kth, torch.full_like(scaled, float("-inf")), scaled)
    probs = torch.softmax(scaled, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def _plan(requests: list[Request], results: dict, decode_batch: int, stop_token):
    """The forwards of a batch, in order: ``("prefill", [r])`` for each request, then ``("decode", batch)``
    round-robin over the live requests. Lazy: which requests are live is read when the next
    decode round starts, so each step must be committed before the next one is asked for."""
    for r in requests:
        yield "prefill", [r]
    live = [r for r in requests if not _done(results[r.id], r, stop_token)]
    while live:
        size = decode_batch or len(live)
        for i in range(0, len(live), size):
            yield "decode", live[i: i + size]
        live = [r for r in live if not _done(results[r.id], r, stop_token)]


@torch.no_grad()
def generate(model, session, requests: list[Request], *, vocab_size: int, max_positions: int, device,
             tp_group=None, pp_group=None, greedy: bool = True, temperature: float = 1.0, top_k: int = 0, seed: int = 0,
             stop_token: int | None = None, token_limit: int | None = None, decode_batch: int = 0, lockstep=None,
             on_step=None, parts: int = 1) -> list[Generation]:
    """Serve ``requests``; returns one :class:`Generation` per request, in order.

    Prefill runs one request per forward; decode runs ``decode_batch`` requests per
    forward (0: every request still generating), round-robin over the batches.
    ``token_limit``: only ids below it are generated (a tokenizer smaller than the
    model's padded vocabulary); ``stop_token`` ends a request early.

    ``lockstep`` (MA separation, :class:`~megatron_fapool.inference.lockstep.Lockstep`):
    every attention replica of the job steps together, one forward each per step; a
    replica with no work left runs empty steps until none has any (``requests`` may be
    empty). A step that failed on any replica because an expert rank was lost is undone
    (K/V caches, sampler) and redone once the lockstep has recovered, or the error is
    raised. ``on_step(kind, batch_size)`` is called after each step of this replica.

    ``parts`` (MA separation's ping-pong, ``ma_separation.micro_batches``): a decode step's
    batch runs as that many parts taking turns (:mod:`megatron_fapool.moe.pingpong`), so one
    part's attention overlaps another's experts; at most one part per request, and in
    lockstep the smallest step of any replica sets it. Tokens do not change.
    """
    validate_requests(requests, vocab_size=vocab_size, max_positions=max_positions)
    if getattr(model, "position_embedding_type", None) == "rope" and not isinstance(
            model.rotary_pos_emb, PositionalRotaryEmbedding):
        raise ValueError("the model's RoPE ignores position_ids, so decode rows would sit at position 0: build it"
                         " with models.gpt.build_gpt_model or call models.rope.install_rope(model)")
    if decode_batch < 0:
        raise RequestError(f"decode_batch must be >= 0 (0: all live requests), got {decode_batch}")
    model.eval()
    gen = torch.Generator().manual_seed(seed)  # the same on every TP rank: same logits, same draws
    pick = dict(greedy=greedy, temperature=temperature, top_k=top_k, generator=gen, limit=token_limit)
    results = {r.id: Generation(id=r.id, prompt_len=len(r.prompt)) for r in requests}

    if parts < 1:
        raise RequestError(f"parts must be >= 1, got {parts}")
    if parts > 1 and pp_group is not None and dist.get_world_size(pp_group) > 1:
        raise RequestError("ping-pong parts need one pipeline stage")

    def run(step, n_parts: int) -> list[int]:
        kind, batch = step
        if kind == "prefill":
            ids = torch.tensor([batch[0].prompt], dtype=torch.long, device=device)
            with session.step(batch[0].id, "prefill"):
                return _next_tokens(model, ids, [0], device, tp_group, pp_group, pick)
        outs = [results[r.id] for r in batch]
        ids = torch.tensor([[o.tokens[-1]] for o in outs], dtype=torch.long, device=device)
        positions = [o.prompt_len + len(o.tokens) - 1 for o in outs]
        if n_parts > 1:
            return _decode_in_parts(model, session, [r.id for r in batch], ids, positions, n_parts, device,
                                    tp_group, pick)
        with session.step([r.id for r in batch], "decode"):
            return _next_tokens(model, ids, positions, device, tp_group, pp_group, pick)

    def step_parts(step) -> int:
        return min(parts, len(step[1])) if step[0] == "decode" else 1

    def commit(step, tokens: list[int], t0: float) -> None:
        kind, batch = step
        _sync(device)
        end = time.perf_counter()
        now = end - start
        for r, token in zip(batch, tokens):
            out = results[r.id]
            out.tokens.append(token)
            out.done_s = now
            if kind == "prefill":
                out.pooled = session.is_pooled(r.id)
                out.ttft_s = now
            else:
                out.decode_s.append(end - t0)
        if on_step is not None:
            on_step(kind, len(batch))

    _sync(device)
    start = time.perf_counter()
    try:
        plan = _plan(requests, results, decode_batch, stop_token)
        if lockstep is None:
            for step in plan:
                t0 = time.perf_counter()
                commit(step, run(step, step_parts(step)), t0)
        else:
            _in_lockstep(plan, run, commit, session, gen, lockstep, results, parts)
        for r in requests:
            results[r.id].kv_tokens_on_base = session.tokens_held(r.id)
    finally:
        for r in requests:
            session.free(r.id)
    return [results[r.id] for r in requests]


def _in_lockstep(plan, run, commit, session, gen, lockstep, results, parts: int) -> None:
    """Run ``plan``'s steps in lockstep with the other attention replicas (see :func:`generate`)."""
    step = next(plan, None)
    t0 = None  # when the current step was first tried (a redone step's time includes the recovery)
    rows = lambda s: len(s[1]) if s is not None and s[0] == "decode" else 1  # noqa: E731
    while lockstep.any_work(step is not None, rows=rows(step), parts=parts):
        t0 = time.perf_counter() if t0 is None else t0
        mark = session.mark([r.id for r in step[1]]) if step is not None else None
        sampler = gen.get_state()
        error, tokens = None, None
        try:
            if step is None:
                lockstep.idle()
            else:
                tokens = run(step, lockstep.parts)
        except PeerLost as e:
            error = e
        if lockstep.failed(error):  # on some replica: recovered (or raised), now redo this step
            if mark is not None:
                session.restore(mark)
            gen.set_state(sampler)
            for out in results.values():
                if out.degraded_from is None:
                    out.degraded_from = len(out.tokens)
            continue
        if step is not None:
            commit(step, tokens, t0)
            step = next(plan, None)
        t0 = None


def _done(out: Generation, r: Request, stop_token) -> bool:
    return len(out.tokens) >= r.max_new_tokens or (stop_token is not None and out.tokens[-1] == stop_token)
