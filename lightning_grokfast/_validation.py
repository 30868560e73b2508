"""Argument checks shared by the transforms and the callbacks.

Each check raises :class:`ValueError` naming the argument, the value given and what is accepted. Any real
or integral number is accepted (numpy scalars from a sweep too); ``bool`` never is.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any, Optional


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


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
    if not _is_int(window_size) or window_size < 1:
        raise ValueError(f"`window_size` must be an integer >= 1, got {window_size!r}.")
    return int(window_size)


def check_choice(name: str, value: Any, choices: Collection[str]) -> str:
    """A string argument that must be one of ``choices``."""
    if value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {accepted}, got {value!r}.")
    return str(value)


def check_bool(name: str, value: Any) -> bool:
    """A boolean argument."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_optional_bool(name: str, value: Any) -> Optional[bool]:
    """A boolean argument that may also be ``None`` (decided automatically)."""
    return None if value is None else check_bool(name, value)
