"""The settings of each transform: one frozen dataclass per transform, checked once, when it is made.

A transform (:class:`~lightning_grokfast.EMAFilter`, ...) and its callback are built from one of these, so every
argument is declared and checked here only. Each settings object also answers the questions about saved state:
what a saved state must have been made with to continue here (:meth:`Settings.must_match`), and what it is shown
as in messages (:meth:`Settings.describe`).

Any real or integral number is accepted (numpy scalars from a sweep too, stored as Python numbers so that a
checkpoint loads with ``weights_only=True``); ``bool`` never is. Every check raises :class:`ValueError` naming the
argument, the value given and what is accepted.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, fields
from functools import partial
from typing import Any, ClassVar, Literal, Optional


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _alpha(name: str, value: Any) -> float:
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1) (the paper recommends 0.8-0.99), got {value!r}.")
    return float(value)


def _lamb(name: str, value: Any) -> float:
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0 (the paper recommends 0.1-5), got {value!r}.")
    return float(value)


def _window(name: str, value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    return int(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def _optional_flag(name: str, value: Any) -> Optional[bool]:
    return None if value is None else _flag(name, value)


def choice(name: str, value: Any, choices: tuple[str, ...] = ()) -> str:
    """``value`` if it is one of ``choices``; else a :class:`ValueError` naming them."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return str(value)


_CHOICES = {"reduction": ("mean", "sum"), "apply_to": ("all", "matrices")}
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "alpha": _alpha,
    "lamb": _lamb,
    "window_size": _window,
    "warmup": _flag,
    "fp32_state": _flag,
    "skip_nonfinite": _flag,
    "foreach": _optional_flag,
    "fused": _optional_flag,
    **{name: partial(choice, choices=c) for name, c in _CHOICES.items()},
}


@dataclass(frozen=True)
class Settings:
    """What every transform takes besides its own arithmetic (keyword-only).

    Args:
        skip_nonfinite: when a gradient to be transformed holds inf or NaN, leave the state and every gradient of
            that step untouched (a warning the first time, counted in ``skipped_steps``).
        foreach: the multi-tensor ``torch._foreach_*`` path (``None``, the default, or ``True``) or a per-tensor
            loop (``False``), as in ``torch.optim``.
        fused: ``True`` runs each group's update as one fused kernel built by ``torch.compile`` (one pass over gradient
            and state; the first step compiles it, seconds to tens of seconds on CPU). ``None``, the default,
            chooses the path of ``foreach``: measured on CPU, fused kernels took 0.46-0.9x the multi-tensor step on
            a 25M-parameter MLP, 0.9-1.33x on the example's transformer and 1.5-2.5x on 1,200 small tensors, and
            their compilation paid back after 90-770 steps on the MLP, after 59,000 or never on the others (README,
            Performance). The environment variable ``LIGHTNING_GROKFAST_FUSED=1`` makes ``None`` choose fused
            kernels where they can be built, and fall back without a word where they cannot. ``True`` fails at the
            first step with a clear message where they cannot (no C++ compiler for CPU, no Triton for CUDA, another
            device). Not together with ``foreach=True``.
    """

    kind: ClassVar[str]
    _: KW_ONLY
    skip_nonfinite: bool = True
    foreach: Optional[bool] = None
    fused: Optional[bool] = None

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _CHECKS[f.name](f.name, getattr(self, f.name)))
        if self.foreach and self.fused:
            raise ValueError("`foreach` and `fused` cannot both be True: choose one path (as in torch.optim).")

    def describe(self) -> dict[str, Any]:
        """The settings of the arithmetic (the positional ones), as saved with the state and shown in messages."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.kw_only}

    def must_match(self) -> dict[str, Any]:
        """Besides the kind, the settings a saved state must have been made with to continue under these."""
        return {}

    def mismatch(self, kind: Any, saved: dict[str, Any]) -> Optional[str]:
        """Why a state saved by transform ``kind`` with settings ``saved`` cannot continue under these; ``None``
        if it can."""
        if kind != self.kind:
            return f"the state is of the {kind!r} transform; this one is {self.kind!r}"
        wrong = {k: saved.get(k) for k, v in self.must_match().items() if saved.get(k) != v}
        if wrong:
            now = ", ".join(f"{k}={v!r}" for k, v in self.must_match().items())
            return f"the state was saved with {', '.join(f'{k}={v!r}' for k, v in wrong.items())}; this has {now}"
        return None

    def changed(self, saved: dict[str, Any]) -> dict[str, Any]:
        """The settings of the arithmetic that differ from ``saved`` (a state continues under them): name -> saved."""
        return {k: saved[k] for k, v in self.describe().items() if k in saved and saved[k] != v}


@dataclass(frozen=True)
class FilterSettings(Settings):
    """What both Grokfast filters take besides :class:`Settings` (keyword-only).

    Args:
        fp32_state: keep the state of 16-bit gradients in float32, with float32 arithmetic; the result is written
            back in the gradient's dtype. ``False`` keeps it in the gradient's dtype: half the memory, but a bfloat16
            EMA stops moving once ``(1 - alpha) * |g - mu|`` falls below bfloat16's resolution.
    """

    _: KW_ONLY
    fp32_state: bool = True

    def copies(self) -> int:
        """State tensors per parameter, in units of the parameter's size."""
        raise NotImplementedError


@dataclass(frozen=True)
class EMASettings(FilterSettings):
    """Grokfast-EMA (the paper's Algorithm 2).

    Args:
        alpha: EMA momentum in [0, 1); the paper recommends 0.8-0.99.
        lamb: amplification, finite and >= 0; the paper recommends 0.1-5.
    """

    kind: ClassVar[str] = "ema"
    alpha: float = 0.98
    lamb: float = 2.0

    def copies(self) -> int:
        return 1


@dataclass(frozen=True)
class MASettings(FilterSettings):
    """Grokfast-MA (the paper's Algorithm 1).

    Args:
        window_size: number of past gradients averaged, an integer >= 1 (the paper uses 100).
        lamb: amplification, finite and >= 0 (the paper uses 5).
        warmup: leave gradients untouched until the window is full.
        reduction: ``"mean"`` or ``"sum"`` of the window.
    """

    kind: ClassVar[str] = "ma"
    window_size: int = 100
    lamb: float = 5.0
    warmup: bool = True
    reduction: Literal["mean", "sum"] = "mean"

    def must_match(self) -> dict[str, Any]:
        return {"window_size": self.window_size}

    def copies(self) -> int:
        return self.window_size + 1


@dataclass(frozen=True)
class OrthoGradSettings(Settings):
    """⊥Grad.

    Args:
        apply_to: ``"all"`` parameters, or only ``"matrices"`` (tensors of two or more dimensions: weights and
            embeddings, not biases, LayerNorm gains or scalars).
    """

    kind: ClassVar[str] = "orthograd"
    apply_to: Literal["all", "matrices"] = "all"
