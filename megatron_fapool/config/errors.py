"""One error type for every bad input, with a one-line message.

The message always names where the problem is (file and key path), what was found,
and what was expected, so that a user can fix it without reading code.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "from_validation_error"]


class ConfigError(ValueError):
    """Invalid configuration. ``str(err)`` is a single line naming the key."""

    def __init__(self, key: str, message: str, *, source: str | None = None):
        self.key = key
        self.source = source
        self.reason = message
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}".replace("\n", " "))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def from_validation_error(err, *, prefix: str, source: str | None = None, known_keys=None) -> ConfigError:
    """Turn a pydantic ``ValidationError`` into a one-line :class:`ConfigError`.

    ``prefix`` is the path of the validated object (``fapool`` or ``language_model``);
    ``known_keys(path_tuple)`` returns the keys allowed at a path, to list them when a
    key is unknown (a misspelling, most of the time).
    """
    # An unknown key is usually the cause of a 'missing' one (a misspelling): report it first.
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = tuple(str(p) for p in first["loc"])
    key = ".".join(((prefix,) if prefix else ()) + loc) or prefix or "<top level>"
    kind = first["type"]
    if kind == "extra_forbidden":
        allowed = known_keys(loc[:-1]) if known_keys else None
        hint = f"; expected one of: {', '.join(sorted(allowed))}" if allowed else ""
        msg = f"unknown key{hint} (check the spelling)"
    elif kind == "missing":
        msg = "required key is missing"
    else:
        msg = f"got {_short(first.get('input'))}: {first['msg']}"
    more = len(errors) - 1
    if more:
        msg += f" (and {more} more error{'s' if more > 1 else ''})"
    return ConfigError(key, msg, source=source)
