"""Which backend can do a call, and what ``auto`` picks.

Capability tables (:func:`available_backends`, :func:`backend_unsupported_reason`), the
``auto`` preference (:data:`AUTO_PREFERENCE`) and :class:`BackendSelector`, which resolves
``auto`` and remembers the backends that failed at run time for the calls it is given.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from ... import _optional
from ...config.schema import ATTENTION_BACKENDS
from .layout import FLOATS, LOW_PRECISION, check_qkv

__all__ = [
    "AUTO_PREFERENCE",
    "BACKENDS",
    "BackendSelector",
    "FailureKey",
    "auto_failures",
    "available_backends",
    "backend_unsupported_reason",
    "require_backend",
    "select_backend",
]

#: The kernel backends (``"auto"`` is not one: it picks among these).
BACKENDS: tuple[str, ...] = tuple(name for name in ATTENTION_BACKENDS if name != "auto")

#: What ``auto`` tries, in order, keyed by ``(device type, precision,
#: requires_backward)`` with precision ``"16"`` (fp16/bf16), ``"32"`` or ``"64"``.
#: Backends that do not support the call (device, dtype, head_dim, backward)
#: are skipped; ``math`` always closes the list.  With ``requires_backward`` the
#: order is by forward+backward time of one backend (``local_attention`` runs
#: both passes on the backend it picked).  This is the single place the
#: preference lives; ``tools/bench_local_attention.py`` checks it against
#: measurements ("auto picks fastest: yes/no"); the measurements behind the order
#: are in docs/benchmarks.md ("Kernel preference").
#:
#: CUDA: cuDNN before SDPA's FA2 kernel for 16-bit; the flash_attn package is the
#: same FA2 as sdpa_flash; for float32 only the memory-efficient kernel and flex are
#: fused; flex compiles per shape, so it comes after the SDPA kernels.
#: CPU: sdpa_flash first, except 16-bit forward+backward, where its backward is slower
#: than math's.  ``flex`` on CPU is eager (materialises all scores) and forward-only:
#: never chosen.
_CUDA_16 = ("sdpa_cudnn", "flash_attn", "sdpa_flash", "sdpa_efficient", "flex", "math")
_CUDA_32 = ("sdpa_efficient", "flex", "math")
AUTO_PREFERENCE: dict[tuple[str, str, bool], tuple[str, ...]] = {
    ("cuda", "16", False): _CUDA_16,
    ("cuda", "16", True): _CUDA_16,
    ("cuda", "32", False): _CUDA_32,
    ("cuda", "32", True): _CUDA_32,
    ("cuda", "64", False): ("math",),
    ("cuda", "64", True): ("math",),
    ("cpu", "16", False): ("sdpa_flash", "math"),
    ("cpu", "16", True): ("math", "sdpa_flash"),
    ("cpu", "32", False): ("sdpa_flash", "math"),
    ("cpu", "32", True): ("sdpa_flash", "math"),
    ("cpu", "64", False): ("sdpa_flash", "math"),
    ("cpu", "64", True): ("sdpa_flash", "math"),
}

_MAX_FUSED_HEAD_DIM = 256

#: (device type, dtype, head_dim, backend, phase): one backend that failed for one kind of call.
FailureKey = tuple[str, torch.dtype, int, str, str]

_aten = torch.ops.aten


def _precision(dtype: torch.dtype) -> str:
    return {torch.float64: "64", torch.float32: "32"}.get(dtype, "16")


# --------------------------------------------------------------------------------------
# Capability tables
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _cudnn_version() -> int:
    try:
        return int(torch.backends.cudnn.version() or 0)
    except Exception:  # noqa: BLE001
        return 0


@functools.lru_cache(maxsize=None)
def _flex_importable() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton

        return bool(has_triton())
    except Exception:  # noqa: BLE001
        return False


def _device_unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` at all (None if it can)."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {BACKENDS + ('auto',)}"
    if name in ("math", "sdpa_math"):
        return None
    kind = device.type
    if kind == "cpu":
        if name == "sdpa_flash":
            if not hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
                return "this torch has no CPU flash attention op"
            return None
        if name == "flex":
            return None if _flex_importable() else "torch.nn.attention.flex_attention is missing"
        return "CUDA only"
    if kind != "cuda":
        return f"not implemented for device type {kind!r}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    cap = _cuda_capability(_cuda_index(device))
    if name == "sdpa_flash":
        ok = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
        if not ok:
            return "this torch was built without flash attention"
        if cap < (8, 0):
            return f"needs compute capability >= 8.0, device has {cap[0]}.{cap[1]}"
        return None
    if name == "sdpa_efficient":
        if not hasattr(_aten, "_efficient_attention_forward"):
            return "this torch has no memory-efficient attention op"
        if cap < (5, 0):
            return f"needs compute capability >= 5.0, device has {cap[0]}.{cap[1]}"
        return None
    if name == "sdpa_cudnn":
        if torch.version.hip:
            return "cuDNN attention is not available on ROCm"
        if not torch.backends.cudnn.is_available() or _cudnn_version() < 90000:
            return f"needs cuDNN >= 9.0 (found {_cudnn_version() or 'none'})"
        if cap < (8, 0):
            return f"needs compute capability >= 8.0, device has {cap[0]}.{cap[1]}"
        return None
    if name == "flex":
        if not _flex_importable():
            return "torch.nn.attention.flex_attention is missing"
        if not _has_triton():
            return "triton is not available"
        if cap < (8, 0):
            return f"needs compute capability >= 8.0, device has {cap[0]}.{cap[1]}"
        return None
    if name == "flash_attn":
        if not _optional.HAS_FLASH_ATTN:
            return f"flash_attn is not importable ({_optional.IMPORT_ERRORS.get('flash_attn', '?')})"
        if cap < (8, 0):
            return f"needs compute capability >= 8.0, device has {cap[0]}.{cap[1]}"
        return None
    return "unsupported"  # pragma: no cover


def _unsupported_reason(
    name: str, device: torch.device, dtype: torch.dtype, head_dim: int, requires_backward: bool
) -> str | None:
    """Why backend ``name`` cannot do this call (None if it can)."""
    reason = _device_unavailable_reason(name, device)
    if reason is not None:
        return reason
    if name in ("math", "sdpa_math"):
        return None
    kind = device.type

    def need_dtypes(allowed: Sequence[torch.dtype]) -> str | None:
        if dtype not in allowed:
            return f"dtype {dtype} not supported (supports {', '.join(str(a) for a in allowed)})"
        return None

    def need_head_dim(multiple: int, max_dim: int = _MAX_FUSED_HEAD_DIM) -> str | None:
        if head_dim % multiple != 0 or head_dim > max_dim:
            return f"head_dim {head_dim} not supported (needs a multiple of {multiple}, <= {max_dim})"
        return None

    if kind == "cpu":
        if name == "sdpa_flash":
            return need_dtypes(FLOATS)
        if name == "flex":
            if requires_backward:
                return "torch's FlexAttention has no backward on CPU (forward only)"
            return need_dtypes(FLOATS)
        return "CUDA only"

    if name in ("sdpa_flash", "flash_attn"):
        return need_dtypes(LOW_PRECISION) or need_head_dim(8)
    if name == "sdpa_efficient":
        return need_dtypes((*LOW_PRECISION, torch.float32)) or need_head_dim(
            4 if dtype == torch.float32 else 8
        )
    if name == "sdpa_cudnn":
        cap = _cuda_capability(_cuda_index(device))
        max_dim = 256 if (cap[0] == 9 and _cudnn_version() >= 90500) else 128
        return need_dtypes(LOW_PRECISION) or need_head_dim(8, max_dim)
    if name == "flex":
        if head_dim < 16:
            return f"head_dim {head_dim} < 16 not supported by the Triton kernels"
        return need_dtypes((*LOW_PRECISION, torch.float32)) or need_head_dim(1)
    return None




def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device`` for at least some dtype (order of BACKENDS)."""
    dev = torch.device(device)
    return [n for n in BACKENDS if _device_unavailable_reason(n, dev) is None]


def backend_unsupported_reason(
    backend: str, q: Tensor, k: Tensor, v: Tensor, *, requires_backward: bool
) -> str | None:
    """``None`` if ``backend`` can run this call, else a human-readable reason."""
    check_qkv(q, k, v)
    return _unsupported_reason(backend, q.device, q.dtype, q.shape[-1], requires_backward)


def require_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, requires_backward: bool) -> None:
    """Raise ``ValueError`` naming the reason if backend ``name`` cannot do this call."""
    reason = _unsupported_reason(name, device, dtype, head_dim, requires_backward)
    if reason is not None:
        what = "backward" if requires_backward else "forward"
        raise ValueError(
            f"attention backend {name!r} cannot run this {what} "
            f"(device={device}, dtype={dtype}, head_dim={head_dim}): {reason}"
        )


# --------------------------------------------------------------------------------------
# auto
# --------------------------------------------------------------------------------------


class BackendSelector:
    """Resolves ``backend="auto"`` and remembers the backends that failed at run time.

    ``auto`` walks :data:`AUTO_PREFERENCE` and takes the first backend that supports
    the call.  When that backend raises at run time, the dispatcher records the failure
    here (:meth:`record_failure`) and the selector skips that backend for later calls of
    the same kind (device type, dtype, head_dim, phase).  The memory is this object's:
    a caller that wants failures remembered across calls (a model's attention module,
    a serving loop) keeps one selector and passes it as ``selector=`` to every call; a
    call given none uses a fresh selector, so it remembers nothing beyond itself.
    """

    def __init__(self) -> None:
        self._failed: dict[FailureKey, str] = {}

    def candidates(
        self, device: torch.device, dtype: torch.dtype, head_dim: int, requires_backward: bool, phase: str
    ) -> list[str]:
        """The backends ``auto`` tries for this call, in order; ``math`` is always last."""
        pref = AUTO_PREFERENCE.get((device.type, _precision(dtype), requires_backward), ("math",))
        names = [
            n
            for n in pref
            if _unsupported_reason(n, device, dtype, head_dim, requires_backward) is None
            and (device.type, dtype, head_dim, n, phase) not in self._failed
        ]
        if "math" not in names:
            names.append("math")
        return names

    def select(self, q: Tensor, k: Tensor, v: Tensor, *, requires_backward: bool) -> str:
        """The backend ``auto`` resolves to for this call (deterministic given the recorded failures)."""
        check_qkv(q, k, v)
        phase = "bwd" if requires_backward else "fwd"
        return self.candidates(q.device, q.dtype, q.shape[-1], requires_backward, phase)[0]

    def record_failure(self, key: FailureKey, reason: str) -> None:
        """Skip backend ``key[3]`` for calls of kind ``key`` from now on."""
        self._failed[key] = reason

    def failures(self) -> dict[FailureKey, str]:
        """Backends dropped after a run-time failure: key -> error text (a copy)."""
        return dict(self._failed)


def select_backend(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, requires_backward: bool, selector: BackendSelector | None = None
) -> str:
    """The backend ``'auto'`` resolves to for this call (deterministic).

    ``causal`` does not change the choice: every backend supports both masks
    (top-left-only kernels via the prefix split).  With ``selector``, backends it
    recorded as failed are skipped.
    """
    del causal
    return (selector if selector is not None else BackendSelector()).select(q, k, v, requires_backward=requires_backward)


def auto_failures(selector: BackendSelector) -> dict[FailureKey, str]:
    """Backends that ``auto`` dropped after a run-time failure in calls given ``selector``."""
    return selector.failures()
