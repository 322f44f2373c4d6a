"""Detection of optional dependencies.

Everything in ``megatron_fapool`` must import and run without the optional
packages below; modules that can use them check the flags here instead of
importing them directly.  Detection runs once, when this module is imported,
and never raises: a package that is installed but fails to import (a CUDA
extension built against another torch, say) counts as absent, and the reason is
kept in :data:`IMPORT_ERRORS` so that tools can print it.

Flags
-----
``HAS_FLASH_ATTN``  the ``flash_attn`` package (Dao-AILab FlashAttention 2) imports.
``HAS_APEX``        NVIDIA ``apex`` imports.
``HAS_TRITON``      OpenAI ``triton`` imports (``triton_language`` is ``triton.language``).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = [
    "HAS_FLASH_ATTN",
    "FLASH_ATTN_VERSION",
    "flash_attn",
    "HAS_APEX",
    "apex",
    "HAS_TRITON",
    "triton",
    "triton_language",
    "IMPORT_ERRORS",
    "summary",
]

#: package name -> why it is unavailable ("not installed" or the import error).
IMPORT_ERRORS: dict[str, str] = {}


def _try_import(name: str) -> ModuleType | None:
    try:
        if importlib.util.find_spec(name) is None:
            IMPORT_ERRORS[name] = "not installed"
            return None
    except (ImportError, ValueError) as exc:  # broken parent package / odd spec
        IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}"
        return None
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}"
        return None


flash_attn: ModuleType | None = _try_import("flash_attn")
HAS_FLASH_ATTN: bool = flash_attn is not None
FLASH_ATTN_VERSION: str | None = getattr(flash_attn, "__version__", None) if flash_attn else None

apex: ModuleType | None = _try_import("apex")
HAS_APEX: bool = apex is not None

triton: ModuleType | None = _try_import("triton")
triton_language: ModuleType | None = _try_import("triton.language") if triton is not None else None
HAS_TRITON: bool = triton is not None and triton_language is not None


def summary() -> str:
    """One line saying which optional packages are usable (for logs and tools)."""
    parts = []
    for name, mod in (("flash_attn", flash_attn), ("apex", apex), ("triton", triton)):
        if mod is not None:
            parts.append(f"{name}={getattr(mod, '__version__', 'yes')}")
        else:
            parts.append(f"{name}=no ({IMPORT_ERRORS.get(name, 'unknown')})")
    return ", ".join(parts)
