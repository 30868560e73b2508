"""Grokfast gradient filters in plain PyTorch (no Lightning).

Both filters amplify the slow component of every gradient, in place, between ``backward()`` and
``optimizer.step()`` (Lee et al. 2024, arXiv 2405.20233):

* :class:`EMAFilter` (Algorithm 2): ``mu = alpha * mu + (1 - alpha) * g`` then ``g += lamb * mu``,
  where ``mu`` starts as a copy of the parameter's first gradient.
* :class:`MAFilter` (Algorithm 1): ``g += lamb * mean(last window_size raw gradients)`` (or their sum),
  from a ring buffer and a running sum, so a step costs the same whatever the window.

The state is always built from the raw gradients and never aliases ``.grad``. For 16-bit gradients it is kept
in float32 by default (``fp32_state``). Each filter has a per-tensor and a multi-tensor function of one
signature, chosen once, as in ``torch.optim``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, TypeVar

import torch
from torch import Tensor

from lightning_grokfast import _fused
from lightning_grokfast._sharded import local
from lightning_grokfast.settings import EMASettings, FilterSettings, MASettings
from lightning_grokfast.transform import GradientTransform, Group, Params, check_tensor, compute_dtype

F = TypeVar("F", bound=FilterSettings)
Sums = tuple[Tensor, Tensor]  # per tensor of a group: <raw g, what was added> and |what was added|^2 (float64)
_NO_SUMS: Sums = (torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))


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
        return None if self.filtered_norm is None else _ratio(self.filtered_norm, self.raw_norm)

    @property
    def slow_ratio(self) -> Optional[float]:
        """``slow_norm / raw_norm``: the size of the added slow component relative to the raw gradient."""
        return None if self.slow_norm is None else _ratio(self.slow_norm, self.raw_norm)


def _ratio(num: float, den: Optional[float]) -> Optional[float]:
    return num / den if den and math.isfinite(den) else None


def sq_norms(tensors: list[Tensor]) -> Tensor:
    """Per-tensor squared L2 norms (computed in float32 at least), stacked into one float64 tensor."""
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)).double().square()


def dots(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """Per-pair dot products ``<x, y>`` of flat tensors (one ``torch.dot`` each: no temporaries), stacked into one
    float64 tensor."""
    return torch.stack([torch.dot(x, y) for x, y in zip(xs, ys)]).double()


def in_dtype(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``tensors`` in ``dtype`` (the same tensors when they already are)."""
    return tensors if tensors[0].dtype == dtype else [t.to(dtype) for t in tensors]


def _added(grads: list[Tensor], slows: list[Tensor], scale: float) -> Sums:
    """Per pair: ``<g, scale * slow>`` and ``|scale * slow|^2``."""
    flat = [g.reshape(-1) for g in grads], [s.reshape(-1) for s in slows]
    return scale * dots(*flat), scale**2 * sq_norms(slows)


class GradientFilter(GradientTransform[F]):
    """Base of the Grokfast filters: the 16-bit state rule, the state size and the statistics of a step."""

    def _state_dtype(self, grad_dtype: torch.dtype) -> torch.dtype:
        return compute_dtype(grad_dtype) if self.settings.fp32_state else grad_dtype

    def expected_state_bytes(self) -> int:
        size = sum(local(p).numel() * self._state_dtype(p.dtype).itemsize for p in self._params.values())
        return self.settings.copies() * size

    def _memory_rule(self) -> str:
        copies = self.settings.copies()
        what = "one copy" if copies == 1 else f"window_size + 1 = {copies} copies"
        mine = " (this rank's pieces)" if self._sharding is not None else ""
        return f"{what} of {self.numel():,} parameter values{mine}"

    def _memory_advice(self) -> str:
        window = "Use the EMA filter (one copy) or a smaller `window_size`. " if self.settings.copies() > 1 else ""
        return window + "Keep 16-bit state with `fp32_state=False`, or filter fewer parameters."

    def _prepare(self, group: Group, compute_stats: bool) -> dict[str, Tensor]:
        return {"sq_norms": sq_norms(group.grads)} if compute_stats else {}

    def _stats(self, applied: bool, skipped_nonfinite: bool = False) -> FilterStats:
        return FilterStats(applied=applied, skipped_nonfinite=skipped_nonfinite)

    def _apply(self, groups: list[Group], prepared: list[dict[str, Tensor]], compute_stats: bool) -> FilterStats:
        sums = [self._filter(group, compute_stats) for group in groups]
        num = sum(len(g.grads) for g in groups)
        if not compute_stats:
            return FilterStats(applied=True, num_tensors=num)
        raw = float(sum(p["sq_norms"].sum() for p in prepared))  # over all ranks' pieces already, when sharded
        added = torch.stack([torch.stack([(v * (g.weights if g.weights is not None else 1)).sum() for v in s])
                             for g, s in zip(groups, sums)]).sum(0)  # fmt: skip
        if self._sharding is not None:
            added = self._sharding.sum(added)
        dot, slow = added.tolist()
        return FilterStats(
            applied=True,
            num_tensors=num,
            raw_norm=math.sqrt(raw),
            filtered_norm=math.sqrt(max(raw + 2 * dot + slow, 0.0)),  # |g + s|^2 = |g|^2 + 2 <g, s> + |s|^2
            slow_norm=math.sqrt(slow),
            cosine=max(-1.0, min(1.0, dot / math.sqrt(raw * slow))) if raw > 0 and slow > 0 else None,
        )

    def _filter(self, group: Group, compute_stats: bool) -> Sums:
        """Filter one group in place; with ``compute_stats``, the sums of what was added."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- EMA


def _single_tensor_ema(grads: list[Tensor], mus: list[Tensor], alpha: float, lamb: float, stats: bool) -> Sums:
    sums = []
    for g, mu in zip(grads, mus):
        raw = g.to(mu.dtype)
        mu.lerp_(raw, 1.0 - alpha)
        if stats:
            sums.append(_added([raw], [mu], lamb))
        if lamb:
            g.add_(mu, alpha=lamb)
    return (torch.cat([d for d, _ in sums]), torch.cat([s for _, s in sums])) if stats else _NO_SUMS


def _multi_tensor_ema(grads: list[Tensor], mus: list[Tensor], alpha: float, lamb: float, stats: bool) -> Sums:
    raw = in_dtype(grads, mus[0].dtype)
    torch._foreach_lerp_(mus, raw, 1.0 - alpha)
    sums = _added(raw, mus, lamb) if stats else _NO_SUMS
    if lamb:
        torch._foreach_add_(grads, mus, alpha=lamb)
    return sums


def _ema_kernel(grads: list[Tensor], mus: list[Tensor], weight: float, lamb: float, stats: bool) -> Optional[Tensor]:
    """What :func:`_fused_ema` compiles: per tensor, one read and one write of gradient and state."""
    rows = []
    for g, mu in zip(grads, mus):
        raw = g.to(mu.dtype, copy=True)  # not an alias of g, which the graph writes
        new = torch.lerp(mu, raw, weight)
        mu.copy_(new)
        if stats:
            rows.append(torch.stack([lamb * (raw * new).sum(), lamb * lamb * (new * new).sum()]).double())
        if lamb:
            g.copy_(raw + lamb * new)
    return torch.stack(rows) if stats else None


def _fused_ema(grads: list[Tensor], mus: list[Tensor], alpha: float, lamb: float, stats: bool) -> Sums:
    sums = _fused.run(_ema_kernel, (grads, mus), (), 1.0 - alpha, lamb, stats)
    return (sums[:, 0], sums[:, 1]) if stats else _NO_SUMS


_EMA = {"single": _single_tensor_ema, "multi": _multi_tensor_ema, "fused": _fused_ema}  # by Group.path


class EMAFilter(GradientFilter[EMASettings]):
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
        fused: one fused kernel per group, built by ``torch.compile`` at the first step (see
            :class:`~lightning_grokfast.settings.Settings`).

    Example::

        grokfast = EMAFilter(model.named_parameters(), alpha=0.98, lamb=2.0)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            grokfast.step()
            optimizer.step()
    """

    settings_type = EMASettings

    def __init__(
        self,
        params: Params,
        alpha: float = 0.98,
        lamb: float = 2.0,
        *,
        fp32_state: bool = True,
        skip_nonfinite: bool = True,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
    ) -> None:
        options: dict[str, Any] = {"fp32_state": fp32_state, "skip_nonfinite": skip_nonfinite, "foreach": foreach}
        super().__init__(params, EMASettings(alpha, lamb, fused=fused, **options))

    def _init_state(self, name: str, grad: Tensor) -> dict[str, Any]:
        mu = grad.to(self._state_dtype(grad.dtype), copy=True, memory_format=torch.preserve_format)
        entry = self.state[name] = {"mu": mu}
        return entry

    def _check_entry(self, name: str, param: Tensor, entry: dict[str, Any]) -> None:
        check_tensor(name, "mu", entry.get("mu"), tuple(param.shape))

    def _filter(self, group: Group, compute_stats: bool) -> Sums:
        return _EMA[group.path](group.grads, group.state("mu"), self.settings.alpha, self.settings.lamb, compute_stats)


# ---------------------------------------------------------------------------------------------- MA


def _ma_scale(count: int, window: int, lamb: float, warmup: bool, mean: bool) -> Optional[float]:
    """The factor of the window sum added to a gradient once ``count`` gradients entered the window; ``None``
    while warm-up leaves it as it is."""
    if warmup and count < window:
        return None
    return lamb / min(count, window) if mean else lamb


def _single_tensor_ma(
    grads: list[Tensor], states: list[dict[str, Any]], window: int, lamb: float, warmup: bool, mean: bool, stats: bool
) -> Sums:
    dot, slow = (torch.zeros(len(grads), dtype=torch.float64, device=grads[0].device) for _ in range(2))
    for i, (g, st) in enumerate(zip(grads, states)):
        ring, total = st["window"], st["sum"]
        slot = ring[st["count"] % window]  # the oldest gradient, overwritten below
        raw = g.to(total.dtype)
        if st["count"] >= window:
            total.sub_(slot)
        total.add_(raw)
        slot.copy_(raw)
        st["count"] += 1
        if st["count"] % window == 0:  # the ring came round: drop the rounding of the running sum
            torch.sum(ring, dim=0, out=total)
        scale = _ma_scale(st["count"], window, lamb, warmup, mean)
        if scale is not None:
            if stats:
                dot[i], slow[i] = (v[0] for v in _added([raw], [total], scale))
            if scale:
                g.add_(total, alpha=scale)
    return (dot, slow) if stats else _NO_SUMS


def _multi_tensor_ma(
    grads: list[Tensor], states: list[dict[str, Any]], window: int, lamb: float, warmup: bool, mean: bool, stats: bool
) -> Sums:
    totals = [st["sum"] for st in states]
    slots = [st["window"][st["count"] % window] for st in states]
    full = [i for i, st in enumerate(states) if st["count"] >= window]
    raw = in_dtype(grads, totals[0].dtype)
    if full:
        torch._foreach_sub_([totals[i] for i in full], [slots[i] for i in full])
    torch._foreach_add_(totals, raw)
    torch._foreach_copy_(slots, raw)
    for st in states:
        st["count"] += 1
        if st["count"] % window == 0:
            torch.sum(st["window"], dim=0, out=st["sum"])
    by_scale: dict[float, list[int]] = {}  # tensors whose window sum is added with one factor
    for i, st in enumerate(states):
        scale = _ma_scale(st["count"], window, lamb, warmup, mean)
        if scale is not None:
            by_scale.setdefault(scale, []).append(i)
    dot, slow = (torch.zeros(len(grads), dtype=torch.float64, device=grads[0].device) for _ in range(2))
    for scale, idx in by_scale.items():
        if stats:
            dot[idx], slow[idx] = _added([raw[i] for i in idx], [totals[i] for i in idx], scale)
        if scale:
            torch._foreach_add_([grads[i] for i in idx], [totals[i] for i in idx], alpha=scale)
    return (dot, slow) if stats else _NO_SUMS


def _ma_kernel(
    grads: list[Tensor], slots: list[Tensor], totals: list[Tensor], wrapped: Tensor, scales: Tensor, stats: bool
) -> Optional[Tensor]:
    """What :func:`_fused_ma` compiles: per tensor, the ring write, the running sum and the add in one pass.
    ``wrapped``: 1 where the slot holds the oldest gradient (the ring is full), else 0; ``scales``: the factor of the
    sum added to the gradient, 0 where warm-up leaves it as it is."""
    rows = []
    for i, (g, slot, total) in enumerate(zip(grads, slots, totals)):
        raw = g.to(total.dtype, copy=True)  # not an alias of g, which the graph writes
        new = total - slot * wrapped[i] + raw
        total.copy_(new)
        # a select that always takes raw: written as a plain copy of g, inductor (torch 2.13) stores g's new value
        slot.copy_(torch.where(wrapped[i] <= 1, raw, new))
        if stats:
            rows.append(torch.stack([scales[i] * (raw * new).sum(), scales[i].square() * (new * new).sum()]).double())
        g.copy_(torch.where(scales[i] != 0, raw + scales[i] * new, raw))
    return torch.stack(rows) if stats else None


def _fused_ma(
    grads: list[Tensor], states: list[dict[str, Any]], window: int, lamb: float, warmup: bool, mean: bool, stats: bool
) -> Sums:
    slots = [st["window"][st["count"] % window] for st in states]
    wrapped = [float(st["count"] >= window) for st in states]
    scales = [_ma_scale(st["count"] + 1, window, lamb, warmup, mean) or 0.0 for st in states]
    device, dtype = states[0]["sum"].device, states[0]["sum"].dtype
    vectors = (torch.tensor(wrapped, device=device, dtype=dtype), torch.tensor(scales, device=device, dtype=dtype))
    sums = _fused.run(_ma_kernel, (grads, slots, [st["sum"] for st in states]), vectors, stats)
    for st in states:
        st["count"] += 1
        if st["count"] % window == 0:  # the ring came round: drop the rounding of the running sum
            torch.sum(st["window"], dim=0, out=st["sum"])
    return (sums[:, 0], sums[:, 1]) if stats else _NO_SUMS


_MA = {"single": _single_tensor_ma, "multi": _multi_tensor_ma, "fused": _fused_ma}  # by Group.path


class MAFilter(GradientFilter[MASettings]):
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
        fused: one fused kernel per group, built by ``torch.compile`` at the first step (see
            :class:`~lightning_grokfast.settings.Settings`).
    """

    settings_type = MASettings

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
        fused: Optional[bool] = None,
    ) -> None:
        options: dict[str, Any] = {"fp32_state": fp32_state, "skip_nonfinite": skip_nonfinite, "foreach": foreach}
        settings = MASettings(window_size, lamb, warmup, reduction, fused=fused, **options)
        super().__init__(params, settings)

    def _init_state(self, name: str, grad: Tensor) -> dict[str, Any]:
        dtype = self._state_dtype(grad.dtype)
        ring = grad.new_zeros((self.settings.window_size, *grad.shape), dtype=dtype)
        entry = self.state[name] = {"window": ring, "sum": torch.zeros_like(grad, dtype=dtype), "count": 0}
        return entry

    def _check_entry(self, name: str, param: Tensor, entry: dict[str, Any]) -> None:
        check_tensor(name, "window", entry.get("window"), (self.settings.window_size, *param.shape))
        check_tensor(name, "sum", entry.get("sum"), tuple(param.shape))
        count = entry.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"The state of {name!r} has an invalid 'count' {count!r}.")

    def _filter(self, group: Group, compute_stats: bool) -> Sums:
        s = self.settings
        return _MA[group.path](
            group.grads, group.states, s.window_size, s.lamb, s.warmup, s.reduction == "mean", compute_stats
        )
