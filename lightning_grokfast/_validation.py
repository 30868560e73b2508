"""Argument checks shared by the filters and the callback.

Each check raises :class:`ValueError` naming the argument, the value given and what is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_alpha(alpha: Any) -> float:
    """``alpha``: the EMA momentum, a real number in [0, 1)."""
    if not _is_real(alpha) or not 0.0 <= alpha < 1.0:
        raise ValueError(f"`alpha` must be a number in [0, 1) (the paper recommends 0.8-0.99), got {alpha!r}.")
    return float(alpha)


def check_lamb(lamb: Any) -> float:
    """``lamb``: the amplification factor, a finite real number >= 0."""
    if not _is_real(lamb) or not math.isfinite(lamb) or lamb < 0:
        raise ValueError(f"`lamb` must be a finite number >= 0 (the paper recommends 0.1-5), got {lamb!r}.")
    return float(lamb)


def check_window_size(window_size: Any) -> int:
    """``window_size``: the MA window, an integer >= 1."""
    if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 1:
        raise ValueError(f"`window_size` must be an integer >= 1, got {window_size!r}.")
    return window_size


def check_choice(name: str, value: Any, choices: Collection[str]) -> str:
    """A string argument that must be one of ``choices``."""
    if value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {accepted}, got {value!r}.")
    return str(value)


def check_bool(name: str, value: Any, *, optional: bool = False) -> bool | None:
    """A boolean argument (``None`` allowed too when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        accepted = "True, False or None" if optional else "True or False"
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")
    return value
