"""Attention on one device that also returns the log-sum-exp: the kernel layer.

Under FA Pool, ring/zigzag attention, sharded decode and dilated attention: pure
functions for forward and backward plus one thin autograd wrapper, in the style of
ring-flash-attention.  "Local" (as in :func:`local_attention`) means what it means
everywhere in the package: computed here, with no other rank.

Modules
-------
:mod:`.dispatch`     the public calls, checks, empty rows, the ``sq < sk`` split, ``auto`` fallback
:mod:`.backends`     capability tables, :data:`AUTO_PREFERENCE`, :class:`BackendSelector`
:mod:`.layout`       layout views, GQA expand/reduce, :func:`accumulator_dtype`, input checks
:mod:`.math`, :mod:`.sdpa`, :mod:`.flex`, :mod:`.flash_attn`   the backends' kernels
:mod:`.reference`    the dense float64 reference (tests only)
:mod:`.slots`        serving: decode over a static slot cache (:func:`slot_decode`, Triton kernel in
                     :mod:`.triton_decode`, imported lazily) and packed causal prefill (:func:`packed_causal`)

Conventions
-----------
* Layout ``[batch, seq, heads, head_dim]`` (flash-attn layout) for q, k, v, out
  and the gradients; LSE ``[batch, heads, seq]``, natural log, float32 (float64
  when the inputs are float64, so that float64 pipelines stay exact).
* GQA: q has ``hq`` heads, k/v ``hkv`` heads, ``hq % hkv == 0``; query head ``i``
  uses kv head ``i // (hq // hkv)``.  dk/dv are summed over each group.
* ``softmax_scale=None`` means ``1/sqrt(head_dim)``.
* Causal masking is **bottom-right** aligned: query ``i`` (of ``sq``) sees key
  ``j`` (of ``sk``) iff ``j <= i + (sk - sq)``.  When ``sq > sk`` the first
  ``sq - sk`` rows see no key: they output 0, their lse is ``-inf`` and their
  gradients are 0.  These rows are cut off before any kernel runs, so no kernel
  ever sees an empty row (kernels disagree on what such rows return).
* Backward follows the ring-flash-attention convention: ``out`` and ``lse`` may
  be the *global* (merged) results of a larger attention of which this call
  covers one key block.  Probabilities are recomputed as ``exp(s - lse)`` and
  ``D = rowsum(dout * out)``, so summing the per-block dq (and concatenating /
  summing dk, dv) gives exact gradients of the whole attention.

Backends
--------
:data:`BACKENDS` is ``config.schema.ATTENTION_BACKENDS`` without ``"auto"``.

``math``
    Pure torch, any device and dtype, chunked over query rows (:mod:`.math`).
    Correctness anchor and CPU fallback.
``sdpa_flash``, ``sdpa_efficient``, ``sdpa_cudnn``, ``sdpa_math``
    aten's SDPA kernels (:mod:`.sdpa`).  ``sdpa_flash`` runs on CPU and CUDA; on CPU,
    and for ``sdpa_cudnn``, causal is top-left, so ``sq < sk`` is split (below).
    ``sdpa_math`` is unchunked: a baseline, never chosen by ``auto``.
``flex``
    ``torch.nn.attention.flex_attention`` (:mod:`.flex`), compiled on CUDA.  On CPU it
    is forward-only: an explicit backward request raises ``ValueError``.
``flash_attn``
    The ``flash_attn`` package (FA2) when it imports (:mod:`.flash_attn`).

*Split for top-left kernels*: a causal call with ``sq < sk`` is done as a
non-causal call on the unmasked key prefix ``[0, sk - sq)`` plus a square causal
call on the last ``sq`` keys, merged with :func:`merge_partials`; the backward
runs both parts with the global out/lse and adds dq.

*Recompute backward* (``flex``, ``sdpa_math``, which cannot take a given out/lse):
the block is recomputed with autograd; the algebra is in :mod:`.flex`.

``auto``
    :func:`select_backend` walks :data:`AUTO_PREFERENCE` for the device type and
    takes the first backend that supports the dtype / head_dim / backward.  If
    that backend then raises at run time (anything but out-of-memory), the
    failure is recorded in the call's :class:`BackendSelector`
    (:func:`auto_failures`), a warning is issued, and the next candidate runs;
    explicit backends never fall back.  A selector passed as ``selector=`` keeps
    those failures for later calls; without one, a call starts from a fresh selector.
    The measurements behind :data:`AUTO_PREFERENCE` are in docs/benchmarks.md.
"""

from __future__ import annotations

from .backends import (
    AUTO_PREFERENCE,
    BACKENDS,
    BackendSelector,
    auto_failures,
    available_backends,
    backend_unsupported_reason,
    select_backend,
)
from .dispatch import attention_backward, attention_forward, kernel_forward, local_attention, merge_partials
from .layout import accumulator_dtype
from .slots import packed_causal, slot_decode

__all__ = [
    "AUTO_PREFERENCE",
    "BACKENDS",
    "BackendSelector",
    "accumulator_dtype",
    "attention_backward",
    "attention_forward",
    "auto_failures",
    "available_backends",
    "backend_unsupported_reason",
    "kernel_forward",
    "local_attention",
    "merge_partials",
    "packed_causal",
    "select_backend",
    "slot_decode",
]
