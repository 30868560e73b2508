"""Grokfast gradient filters in plain PyTorch (no Lightning).

Both filters amplify the slow component of every gradient, in place, between ``backward()`` and
``optimizer.step()`` (Lee et al. 2024, arXiv 2405.20233):

* :class:`EMAFilter` (Algorithm 2): ``mu = alpha * mu + (1 - alpha) * g`` then ``g += lamb * mu``,
  where ``mu`` starts as a copy of the parameter's first gradient.
* :class:`MAFilter` (Algorithm 1): ``g += lamb * mean(last window_size raw gradients)`` (or their sum),
  from a ring buffer and a running sum, so a step costs the same whatever the window.

The state is always built from the raw gradients and never aliases ``.grad``. For 16-bit gradients it is kept
in float32 by default (``fp32_state``): an EMA update moves ``mu`` by ``1 - alpha`` of the difference, which
in bfloat16 rounds to no move at all. Tensors of one device and dtype are updated together with
``torch._foreach_*`` ops (``foreach=False`` selects the per-tensor functions, as in ``torch.optim``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional

import torch
from torch import Tensor

from lightning_grokfast._base import (
    LOW_PRECISION,
    Entry,
    GradientTransform,
    Params,
    check_tensor,
    dots,
    norms,
    safe_div,
)
from lightning_grokfast._validation import check_alpha, check_bool, check_choice, check_lamb, check_window_size


@dataclass(frozen=True)
class FilterStats:
    """What one filter step did.

    Attributes:
        applied: whether the gradients were filtered (False when nothing had a gradient, or the step was
            skipped because a gradient held inf or NaN).
        skipped_nonfinite: whether the step was skipped because a gradient held inf or NaN.
        num_tensors: how many gradients were filtered.
        raw_norm: global L2 norm of the raw gradients (only with ``compute_stats=True``).
        filtered_norm: global L2 norm of the filtered gradients (only with ``compute_stats=True``).
        slow_norm: global L2 norm of what was added, ``lamb * slow`` (only with ``compute_stats=True``).
        cosine: cosine between the raw gradients and the slow component; ``None`` when either is zero.
    """

    applied: bool
    skipped_nonfinite: bool = False
    num_tensors: int = 0
    raw_norm: Optional[float] = None
    filtered_norm: Optional[float] = None
    slow_norm: Optional[float] = None
    cosine: Optional[float] = None

    @property
    def amplification(self) -> Optional[float]:
        """``filtered_norm / raw_norm``: 1 means no change; below 1 when the slow component points against the
        gradient (negative cosine)."""
        return None if self.filtered_norm is None else safe_div(self.filtered_norm, self.raw_norm or 0.0)

    @property
    def slow_ratio(self) -> Optional[float]:
        """``slow_norm / raw_norm``: the size of the added slow component relative to the raw gradient."""
        return None if self.slow_norm is None else safe_div(self.slow_norm, self.raw_norm or 0.0)


class GradientFilter(GradientTransform):
    """Base of the Grokfast filters: 16-bit state policy and the statistics of a step.

    A subclass's :meth:`_update` filters one group (one device and dtype) and returns, with statistics asked
    for, ``(<raw g, added>, |added|^2)`` summed over the group; the filtered norm follows from
    ``|g + s|^2 = |g|^2 + 2 <g, s> + |s|^2`` without another pass over the gradients.
    """

    lamb: float

    def __init__(self, params: Params, *, fp32_state: bool, skip_nonfinite: bool, foreach: Optional[bool]) -> None:
        self.fp32_state = check_bool("fp32_state", fp32_state)
        super().__init__(params, skip_nonfinite=skip_nonfinite, foreach=foreach)

    def state_dtype(self, grad_dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if self.fp32_state and grad_dtype in LOW_PRECISION else grad_dtype

    def _copies(self) -> int:
        """State tensors per parameter, in units of the parameter's size."""
        raise NotImplementedError

    def expected_state_bytes(self) -> int:
        size = sum(p.numel() * self.state_dtype(p.dtype).itemsize for p in self._params.values())
        return self._copies() * size

    def _stats(self, applied: bool, skipped_nonfinite: bool = False) -> FilterStats:
        return FilterStats(applied=applied, skipped_nonfinite=skipped_nonfinite)

    def _apply(
        self, groups: list[list[Entry]], foreach: list[bool], raw_norms: Optional[list[Tensor]], compute_stats: bool
    ) -> FilterStats:
        num = sum(len(g) for g in groups)
        sums = [self._update(group, fe, compute_stats) for group, fe in zip(groups, foreach)]
        if not compute_stats or raw_norms is None:
            return FilterStats(applied=True, num_tensors=num)
        raw = float(sum(n.double().square().sum().cpu() for n in raw_norms))
        dot = float(sum(d.cpu() for d, _ in sums))
        slow = float(sum(s.cpu() for _, s in sums))
        filtered = max(raw + 2 * dot + slow, 0.0)
        return FilterStats(
            applied=True,
            num_tensors=num,
            raw_norm=math.sqrt(raw),
            filtered_norm=math.sqrt(filtered),
            slow_norm=math.sqrt(slow),
            cosine=max(-1.0, min(1.0, dot / math.sqrt(raw * slow))) if raw > 0 and slow > 0 else None,
        )

    def _update(self, group: list[Entry], foreach: bool, compute_stats: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _memory_advice(self) -> str:
        return "Keep 16-bit state with `fp32_state=False`, or filter fewer parameters."


def _as_state_dtype(grads: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """The gradients in the state's dtype (the same tensors when the dtypes agree)."""
    return grads if grads[0].dtype == dtype else [g.to(dtype) for g in grads]


def _add_stats(grads: list[Tensor], slows: list[Tensor], scale: float, foreach: bool) -> tuple[Tensor, Tensor]:
    """``(<g, scale * slow>, |scale * slow|^2)`` summed over the pairs, in float64."""
    dot = scale * dots(grads, slows).sum()
    return dot, (scale * norms(slows, foreach).double()).square().sum()


def _lerp_single(xs: list[Tensor], ys: list[Tensor], weight: float) -> None:
    for x, y in zip(xs, ys):
        x.lerp_(y, weight)


def _add_single(xs: list[Tensor], ys: list[Tensor], alpha: float = 1.0) -> None:
    for x, y in zip(xs, ys):
        x.add_(y, alpha=alpha)


def _sub_single(xs: list[Tensor], ys: list[Tensor]) -> None:
    for x, y in zip(xs, ys):
        x.sub_(y)


def _copy_single(xs: list[Tensor], ys: list[Tensor]) -> None:
    for x, y in zip(xs, ys):
        x.copy_(y)


class _Ops(NamedTuple):
    """The in-place list operations of one path, chosen once per group as in ``torch.optim``."""

    lerp: Callable[..., Any]
    add: Callable[..., Any]
    sub: Callable[..., Any]
    copy: Callable[..., Any]


_FOREACH = _Ops(torch._foreach_lerp_, torch._foreach_add_, torch._foreach_sub_, torch._foreach_copy_)
_SINGLE = _Ops(_lerp_single, _add_single, _sub_single, _copy_single)
_NO_STATS = (torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64))


class EMAFilter(GradientFilter):
    """Grokfast-EMA (the paper's Algorithm 2): add an amplified exponential moving average of the gradient.

    Per parameter, ``mu`` starts as a copy of its first gradient; every step ``mu = alpha * mu + (1 - alpha) * g``
    and then ``g = g + lamb * mu``. So the first step gives ``(1 + lamb) * g``. Memory: one copy of the
    parameters (in float32 for 16-bit ones, unless ``fp32_state=False``).

    Args:
        params: parameters, or ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        alpha: EMA momentum in [0, 1); the paper recommends 0.8-0.99.
        lamb: amplification, finite and >= 0; the paper recommends 0.1-5.
        fp32_state: keep the state of 16-bit gradients in float32 (the arithmetic too; the result is written
            back in the gradient's dtype). ``False`` keeps it in the gradient's dtype: half the memory, but a
            bfloat16 EMA stops moving once ``(1 - alpha) * |g - mu|`` falls below its resolution.
        skip_nonfinite: skip steps whose gradients hold inf or NaN, leaving state and gradients untouched.
        foreach: multi-tensor ``torch._foreach_*`` path (``None``/``True``) or a per-tensor loop (``False``).

    Example::

        grokfast = EMAFilter(model.named_parameters(), alpha=0.98, lamb=2.0)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            grokfast.step()
            optimizer.step()
    """

    kind = "ema"

    def __init__(
        self,
        params: Params,
        alpha: float = 0.98,
        lamb: float = 2.0,
        *,
        fp32_state: bool = True,
        skip_nonfinite: bool = True,
        foreach: Optional[bool] = None,
    ) -> None:
        self.alpha = check_alpha(alpha)
        self.lamb = check_lamb(lamb)
        super().__init__(params, fp32_state=fp32_state, skip_nonfinite=skip_nonfinite, foreach=foreach)

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "lamb": self.lamb}

    def _copies(self) -> int:
        return 1

    def _init_state(self, grad: Tensor) -> dict[str, Any]:
        return {"mu": grad.to(self.state_dtype(grad.dtype), copy=True, memory_format=torch.preserve_format)}

    def _check_loaded_entry(self, name: str, param: Tensor, entry: dict[str, Any]) -> None:
        check_tensor(name, "mu", entry.get("mu"), tuple(param.shape))

    def _update(self, group: list[Entry], foreach: bool, compute_stats: bool) -> tuple[Tensor, Tensor]:
        mus = [e.state["mu"] for e in group]
        grads = [e.grad for e in group]
        grads_s = _as_state_dtype(grads, mus[0].dtype)
        ops = _FOREACH if foreach else _SINGLE
        ops.lerp(mus, grads_s, 1.0 - self.alpha)
        stats = _add_stats(grads_s, mus, self.lamb, foreach) if compute_stats else _NO_STATS
        if self.lamb:
            ops.add(grads, mus, alpha=self.lamb)
        return stats


class MAFilter(GradientFilter):
    """Grokfast-MA (the paper's Algorithm 1): add the amplified mean (or sum) of the last gradients.

    Per parameter, a ring buffer holds the last ``window_size`` raw gradients, the current one included, and a
    running sum of them (recomputed exactly from the buffer each time the ring comes round, so rounding never
    drifts). With ``warmup`` the gradient is left as it is until the window is full; then
    ``g = g + lamb * mean(window)`` (``reduction="mean"``) or ``g + lamb * sum(window)``. Without warmup the mean is
    over the gradients seen so far.

    Memory: ``window_size + 1`` copies of the parameters (in float32 for 16-bit ones, unless
    ``fp32_state=False``): 100 x 4 bytes x 50M parameters is about 19 GiB. The first step refuses, before it
    allocates anything, a state that cannot fit in the memory free on the parameters' device.

    Args:
        params: parameters, or ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        window_size: number of past gradients averaged, an integer >= 1 (the paper uses 100).
        lamb: amplification, finite and >= 0 (the paper uses 5).
        warmup: leave gradients untouched until the window is full.
        reduction: ``"mean"`` or ``"sum"`` of the window.
        fp32_state: keep the state of 16-bit gradients in float32 (see :class:`EMAFilter`).
        skip_nonfinite: skip steps whose gradients hold inf or NaN, leaving state and gradients untouched.
        foreach: multi-tensor ``torch._foreach_*`` path (``None``/``True``) or a per-tensor loop (``False``).
    """

    kind = "ma"

    def __init__(
        self,
        params: Params,
        window_size: int = 100,
        lamb: float = 5.0,
        warmup: bool = True,
        reduction: Literal["mean", "sum"] = "mean",
        *,
        fp32_state: bool = True,
        skip_nonfinite: bool = True,
        foreach: Optional[bool] = None,
    ) -> None:
        self.window_size = check_window_size(window_size)
        self.lamb = check_lamb(lamb)
        self.warmup = check_bool("warmup", warmup)
        self.reduction = check_choice("reduction", reduction, ("mean", "sum"))
        super().__init__(params, fp32_state=fp32_state, skip_nonfinite=skip_nonfinite, foreach=foreach)

    def hparams(self) -> dict[str, Any]:
        return {"window_size": self.window_size, "lamb": self.lamb, "warmup": self.warmup, "reduction": self.reduction}

    def _copies(self) -> int:
        return self.window_size + 1

    def _memory_rule(self) -> str:
        return f"window_size + 1 = {self.window_size + 1} copies of them"

    def _memory_advice(self) -> str:
        return "Use the EMA filter (one copy) or a smaller `window_size`."

    def _init_state(self, grad: Tensor) -> dict[str, Any]:
        dtype = self.state_dtype(grad.dtype)
        window = grad.new_zeros((self.window_size, *grad.shape), dtype=dtype)
        return {"window": window, "sum": torch.zeros_like(grad, dtype=dtype), "count": 0}

    def _check_loaded_hparams(self, hparams: dict[str, Any]) -> None:
        saved = hparams.get("window_size")
        if saved != self.window_size:
            raise ValueError(f"The state was saved with window_size={saved!r}; this filter has {self.window_size}.")

    def _check_loaded_entry(self, name: str, param: Tensor, entry: dict[str, Any]) -> None:
        check_tensor(name, "window", entry.get("window"), (self.window_size, *param.shape))
        check_tensor(name, "sum", entry.get("sum"), tuple(param.shape))
        count = entry.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"The state of {name!r} has an invalid 'count' {count!r}.")

    def _update(self, group: list[Entry], foreach: bool, compute_stats: bool) -> tuple[Tensor, Tensor]:
        w = self.window_size
        states = [e.state for e in group]
        grads = [e.grad for e in group]
        sums = [st["sum"] for st in states]
        slots = [st["window"][st["count"] % w] for st in states]  # the oldest gradient, overwritten below
        full = [i for i, st in enumerate(states) if st["count"] >= w]
        ops = _FOREACH if foreach else _SINGLE
        if full:
            ops.sub([sums[i] for i in full], [slots[i] for i in full])
        ops.add(sums, grads, alpha=1.0)
        ops.copy(slots, grads)
        by_scale: dict[float, list[int]] = {}
        for i, st in enumerate(states):
            st["count"] += 1
            if st["count"] % w == 0:  # the ring came round: drop the rounding of the running sum
                torch.sum(st["window"], dim=0, out=st["sum"])
            if self.warmup and st["count"] < w:
                continue
            scale = self.lamb / min(st["count"], w) if self.reduction == "mean" else self.lamb
            by_scale.setdefault(scale, []).append(i)
        dot, slow = _NO_STATS
        grads_s = _as_state_dtype(grads, sums[0].dtype) if compute_stats else grads
        for scale, idx in by_scale.items():
            g_sel, s_sel = [grads[i] for i in idx], [sums[i] for i in idx]
            if compute_stats:
                d, s = _add_stats([grads_s[i] for i in idx], s_sel, scale, foreach)
                dot, slow = dot + d.cpu(), slow + s.cpu()
            if scale:
                ops.add(g_sel, s_sel, alpha=scale)
        return dot, slow
