"""Grokfast gradient filters in plain PyTorch (no Lightning).

Both filters amplify the slow component of every gradient, in place, between ``backward()`` and
``optimizer.step()`` (Lee et al. 2024, arXiv 2405.20233):

* :class:`EMAFilter` (Algorithm 2): ``mu = alpha * mu + (1 - alpha) * g`` then ``g += lamb * mu``,
  where ``mu`` starts as a copy of the parameter's first gradient.
* :class:`MAFilter` (Algorithm 1): ``g += lamb * mean(last window_size raw gradients)`` (or their sum),
  from a ring buffer and a running sum, so a step costs the same whatever the window.

The state is always built from the raw gradients and never aliases ``.grad``. Tensors of one device
and dtype are updated together with ``torch._foreach_*`` ops (``foreach=False`` selects a per-tensor
path, as in ``torch.optim``). A step whose gradients hold inf or NaN leaves the state untouched and
the gradients as they are (``skip_nonfinite``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import Tensor

from lightning_grokfast._validation import check_alpha, check_bool, check_choice, check_lamb, check_window_size

Params = Union[Iterable[Tensor], Iterable[tuple[str, Tensor]]]
_STATE_VERSION = 1
_ZERO = torch.zeros((), dtype=torch.float64)  # the statistics when none are asked for; never written


@dataclass(frozen=True)
class FilterStats:
    """What one :meth:`GradientFilter.step` did.

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
    raw_norm: float | None = None
    filtered_norm: float | None = None
    slow_norm: float | None = None
    cosine: float | None = None

    @property
    def amplification(self) -> float | None:
        """``filtered_norm / raw_norm``: 1 means the filter changed nothing."""
        if self.raw_norm is None or self.filtered_norm is None or self.raw_norm == 0:
            return None
        return self.filtered_norm / self.raw_norm

    @property
    def slow_ratio(self) -> float | None:
        """``slow_norm / raw_norm``: the size of the added slow component relative to the raw gradient."""
        if self.raw_norm is None or self.slow_norm is None or self.raw_norm == 0:
            return None
        return self.slow_norm / self.raw_norm


class _Entry:
    """One parameter taking part in a step: its name, gradient and state."""

    __slots__ = ("grad", "name", "state")

    def __init__(self, name: str, grad: Tensor, state: dict[str, Any]) -> None:
        self.name = name
        self.grad = grad
        self.state = state


def _grouped(entries: list[_Entry]) -> list[list[_Entry]]:
    """Split entries by (device, dtype), the unit a ``_foreach`` kernel works on."""
    groups: dict[tuple[torch.device, torch.dtype], list[_Entry]] = {}
    for e in entries:
        groups.setdefault((e.grad.device, e.grad.dtype), []).append(e)
    return list(groups.values())


def _norms(tensors: list[Tensor], foreach: bool) -> Tensor:
    """Per-tensor L2 norms, in float32 at least, stacked into one tensor."""
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    if foreach:
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype))
    return torch.stack([torch.linalg.vector_norm(t, dtype=dtype) for t in tensors])


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether no tensor holds inf or NaN, in one read of them."""
    if tensors[0].device.type == "cpu":
        # One C++ loop without a result tensor per input: on CPU, per-tensor overheads dominate models of many
        # small tensors. It multiplies by 1.0 in place, which leaves every value (NaN included) bit for bit.
        found_inf = torch.zeros(1)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found_inf, torch.ones(1))
            return not bool(found_inf)
        except (AttributeError, RuntimeError, NotImplementedError):
            pass  # a dtype or a torch version without the CPU kernel
    return bool(torch.isfinite(_norms(tensors, True)).all())


def _dots(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """Per-pair dot products, in float32 at least, stacked into one tensor."""
    return torch.stack([torch.dot(x.reshape(-1).float(), y.reshape(-1).float()) for x, y in zip(xs, ys)])


class GradientFilter:
    """Base of the Grokfast filters: parameter registry, non-finite check, statistics, state dict.

    Args:
        params: an iterable of parameters, or of ``(name, parameter)`` pairs such as
            ``model.named_parameters()``. Names key the state dict; plain parameters are named by position.
        skip_nonfinite: when a gradient to be filtered holds inf or NaN, leave the state and all gradients of
            that step untouched (a warning the first time, counted in :attr:`skipped_steps`).
        foreach: use the multi-tensor ``torch._foreach_*`` path (``None`` or ``True``) or a per-tensor loop
            (``False``).
    """

    kind: str = ""

    def __init__(self, params: Params, *, skip_nonfinite: bool = True, foreach: bool | None = None) -> None:
        self.skip_nonfinite = bool(check_bool("skip_nonfinite", skip_nonfinite))
        self.foreach = check_bool("foreach", foreach, optional=True)
        self.state: dict[str, dict[str, Any]] = {}
        self.skipped_steps = 0
        self._unplaced: set[str] = set()
        self._params: dict[str, Tensor] = {}
        self._names: dict[int, str] = {}
        self.set_parameters(params)

    # ------------------------------------------------------------------ parameters
    def set_parameters(self, params: Params) -> None:
        """(Re)register the parameters, keeping the state of every name that stays.

        Raises:
            ValueError: if ``params`` is empty, mixes named and plain parameters, or repeats a name.
        """
        items = list(params)
        if not items:
            raise ValueError("`params` is empty: the filter needs at least one parameter.")
        named = [isinstance(item, tuple) for item in items]
        if any(named) and not all(named):
            raise ValueError("`params` must be all tensors or all (name, tensor) pairs, not a mix.")
        pairs = items if all(named) else [(str(i), p) for i, p in enumerate(items)]
        params_by_name: dict[str, Tensor] = {}
        names: dict[int, str] = {}
        for name, p in pairs:
            if not isinstance(p, Tensor):
                raise ValueError(f"`params` must hold tensors, got {type(p).__name__} for {name!r}.")
            if name in params_by_name:
                raise ValueError(f"`params` names {name!r} twice.")
            if id(p) in names:  # a tied parameter: filter it once, under its first name
                continue
            params_by_name[name] = p
            names[id(p)] = name
        self._params, self._names = params_by_name, names

    def named_parameters(self) -> dict[str, Tensor]:
        """The registered parameters by name."""
        return dict(self._params)

    def is_registered(self, param: Tensor) -> bool:
        """Whether ``param`` is one of the registered parameters."""
        return id(param) in self._names

    # ------------------------------------------------------------------ step
    def step(self, params: Iterable[Tensor] | None = None, *, compute_stats: bool = False) -> FilterStats:
        """Filter the gradients in place.

        Call it between ``loss.backward()`` (after unscaling, if a GradScaler is used) and
        ``optimizer.step()``, once per optimizer step.

        Args:
            params: the parameters to filter (for instance one optimizer's), all registered; default all.
                Parameters whose ``.grad`` is ``None`` are skipped and keep their state.
            compute_stats: also compute the norms and cosine of :class:`FilterStats` (costs extra reads).

        Returns:
            What the step did.
        """
        with torch.no_grad():
            return self._step(params, compute_stats)

    def _step(self, params: Iterable[Tensor] | None, compute_stats: bool) -> FilterStats:
        entries = self._entries(params)
        if not entries:
            return FilterStats(applied=False)
        groups = _grouped(entries)
        foreach = [self._use_foreach(g) for g in groups]
        grads = [[e.grad for e in g] for g in groups]
        raw_sq: list[Tensor] = []
        if compute_stats:  # the norms serve the non-finite check too
            raw_norms = [_norms(gs, fe) for gs, fe in zip(grads, foreach)]
            finite = all(bool(torch.isfinite(n).all()) for n in raw_norms)
            raw_sq = [n.double().square().sum() for n in raw_norms]
        else:
            finite = not self.skip_nonfinite or all(_all_finite(gs) for gs in grads)
        if self.skip_nonfinite and not finite:
            self._on_nonfinite(next(e.name for e in entries if not bool(torch.isfinite(e.grad).all())))
            return FilterStats(applied=False, skipped_nonfinite=True)
        dots: list[Tensor] = []
        slow_sq: list[Tensor] = []
        for group, fe in zip(groups, foreach):
            for e in group:
                if not e.state or e.name in self._unplaced:
                    self._prepare_state(e)
            dot, slow = self._update(group, fe, compute_stats)
            dots.append(dot)
            slow_sq.append(slow)
        if not compute_stats:
            return FilterStats(applied=True, num_tensors=len(entries))
        filtered_sq = [_norms(gs, fe).double().square().sum() for gs, fe in zip(grads, foreach)]
        raw, filtered, slow, dot = (float(sum(t.cpu() for t in ts)) for ts in (raw_sq, filtered_sq, slow_sq, dots))
        cosine = dot / math.sqrt(raw * slow) if raw > 0 and slow > 0 else None
        return FilterStats(
            applied=True,
            num_tensors=len(entries),
            raw_norm=math.sqrt(raw),
            filtered_norm=math.sqrt(filtered),
            slow_norm=math.sqrt(slow),
            cosine=cosine,
        )

    def _entries(self, params: Iterable[Tensor] | None) -> list[_Entry]:
        if params is None:
            pairs = list(self._params.items())
        else:
            pairs = []
            for p in params:
                name = self._names.get(id(p))
                if name is None:
                    raise ValueError(
                        f"A parameter of shape {tuple(p.shape)} passed to `step` is not registered with this filter."
                    )
                pairs.append((name, p))
        entries = []
        state = self.state
        for name, p in pairs:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise ValueError(f"Parameter {name!r} has a sparse gradient; Grokfast filters need dense gradients.")
            entries.append(_Entry(name, g, state.get(name) or {}))
        return entries

    def _use_foreach(self, group: list[_Entry]) -> bool:
        if self.foreach is not None:
            return self.foreach
        return not group[0].grad.is_complex()  # one dtype per group

    def _on_nonfinite(self, name: str) -> None:
        if self.skipped_steps == 0:
            warnings.warn(
                f"Grokfast: the gradient of {name!r} holds inf or NaN; the filter skipped this step and left its "
                "state and the gradients as they were. Further skips are counted in `skipped_steps` without a "
                "warning.",
                RuntimeWarning,
                stacklevel=4,
            )
        self.skipped_steps += 1

    def _prepare_state(self, e: _Entry) -> None:
        """Create the state at a parameter's first gradient, or move restored state to the gradient."""
        if not e.state:
            e.state = self.state[e.name] = self._init_state(e.grad)
            return
        for key, value in e.state.items():
            if isinstance(value, Tensor) and (value.device != e.grad.device or value.dtype != e.grad.dtype):
                e.state[key] = value.to(device=e.grad.device, dtype=e.grad.dtype)
        self._unplaced.discard(e.name)

    # ------------------------------------------------------------------ subclass hooks
    def _init_state(self, grad: Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def _update(self, group: list[_Entry], foreach: bool, compute_stats: bool) -> tuple[Tensor, Tensor]:
        """Update the state of ``group`` and filter its gradients in place.

        Returns ``(sum of <raw g, slow>, sum of ||lamb * slow||^2)`` when ``compute_stats``, else zeros.
        """
        raise NotImplementedError

    def hparams(self) -> dict[str, Any]:
        """The hyperparameters, as stored in the state dict."""
        raise NotImplementedError

    def _check_loaded_hparams(self, hparams: dict[str, Any]) -> None:
        """Refuse state that this configuration cannot continue from."""

    def _check_loaded_entry(self, name: str, param: Tensor, entry: dict[str, Any]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def state_bytes(self) -> int:
        """Bytes held by the filter state."""
        tensors = [v for s in self.state.values() for v in s.values() if isinstance(v, Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset(self) -> None:
        """Forget all state (and the skip counter)."""
        self.state.clear()
        self.skipped_steps = 0

    def state_dict(self) -> dict[str, Any]:
        """The whole filter state, keyed by parameter name: tensors, numbers and strings only.

        The tensors are references to the live state, as in ``torch.optim``; copy them to keep a snapshot.
        """
        return {
            "version": _STATE_VERSION,
            "kind": self.kind,
            "hparams": self.hparams(),
            "skipped_steps": self.skipped_steps,
            "state": {name: dict(s) for name, s in self.state.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (tensors are copied; they move to the gradients' device
        at the next step).

        Raises:
            ValueError: if the state is of the other filter, of an incompatible configuration (e.g. another MA
                window), names unknown parameters, or holds tensors of other shapes. Nothing is changed then.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "kind" not in state_dict:
            raise ValueError("Not a Grokfast filter state dict (expected the keys 'kind', 'hparams' and 'state').")
        kind = state_dict["kind"]
        if kind != self.kind:
            raise ValueError(f"The state is of the {kind!r} filter; this filter is {self.kind!r}.")
        self._check_loaded_hparams(dict(state_dict.get("hparams", {})))
        loaded = state_dict["state"]
        unknown = sorted(set(loaded) - set(self._params))
        if unknown:
            shown = ", ".join(repr(n) for n in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ValueError(
                f"The state names {len(unknown)} parameter(s) this filter does not have: {shown}. "
                "Was it saved from another model?"
            )
        for name, entry in loaded.items():
            self._check_loaded_entry(name, self._params[name], entry)
        self.state = {
            name: {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in entry.items()}
            for name, entry in loaded.items()
        }
        self._unplaced = set(self.state)  # moved to each gradient's device and dtype at its next step
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"


def _check_tensor(name: str, key: str, value: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"The state of {name!r} has no tensor {key!r}.")
    if tuple(value.shape) != shape:
        raise ValueError(
            f"The state of {name!r} holds {key!r} of shape {tuple(value.shape)}, but this filter expects {shape}."
        )


class EMAFilter(GradientFilter):
    """Grokfast-EMA (the paper's Algorithm 2): add an amplified exponential moving average of the gradient.

    Per parameter, ``mu`` starts as a copy of its first gradient; every step
    ``mu = alpha * mu + (1 - alpha) * g`` and then ``g = g + lamb * mu``. So the first step gives
    ``(1 + lamb) * g``. One state tensor per parameter; no allocation per step.

    Args:
        params: parameters, or ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        alpha: EMA momentum in [0, 1); the paper recommends 0.8-0.99.
        lamb: amplification, finite and >= 0; the paper recommends 0.1-5.
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
        skip_nonfinite: bool = True,
        foreach: bool | None = None,
    ) -> None:
        self.alpha = check_alpha(alpha)
        self.lamb = check_lamb(lamb)
        super().__init__(params, skip_nonfinite=skip_nonfinite, foreach=foreach)

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "lamb": self.lamb}

    def _init_state(self, grad: Tensor) -> dict[str, Any]:
        return {"mu": grad.clone(memory_format=torch.preserve_format)}

    def _check_loaded_entry(self, name: str, param: Tensor, entry: dict[str, Any]) -> None:
        _check_tensor(name, "mu", entry.get("mu"), tuple(param.shape))

    def _update(self, group: list[_Entry], foreach: bool, compute_stats: bool) -> tuple[Tensor, Tensor]:
        mus = [e.state["mu"] for e in group]
        grads = [e.grad for e in group]
        weight = 1.0 - self.alpha
        if foreach:
            torch._foreach_lerp_(mus, grads, weight)
        else:
            for mu, g in zip(mus, grads):
                mu.lerp_(g, weight)
        dot = slow = _ZERO
        if compute_stats:
            dot = self.lamb * _dots(grads, mus).double().sum()
            slow = (self.lamb * _norms(mus, foreach).double()).square().sum()
        if self.lamb != 0:
            if foreach:
                torch._foreach_add_(grads, mus, alpha=self.lamb)
            else:
                for g, mu in zip(grads, mus):
                    g.add_(mu, alpha=self.lamb)
        return dot, slow


class MAFilter(GradientFilter):
    """Grokfast-MA (the paper's Algorithm 1): add the amplified mean (or sum) of the last gradients.

    Per parameter, a ring buffer holds the last ``window_size`` raw gradients, the current one included,
    and a running sum of them (recomputed exactly from the buffer each time the ring comes round, so
    rounding never drifts). With ``warmup`` the gradient is left as it is until the window is full; then
    ``g = g + lamb * mean(window)`` (``reduction="mean"``) or ``g + lamb * sum(window)``. Without warmup
    the mean is over the gradients seen so far. Memory: ``window_size + 1`` copies of the parameters.

    Args:
        params: parameters, or ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        window_size: number of past gradients averaged, an integer >= 1 (the paper uses 100).
        lamb: amplification, finite and >= 0 (the paper uses 5).
        warmup: leave gradients untouched until the window is full.
        reduction: ``"mean"`` or ``"sum"`` of the window.
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
        skip_nonfinite: bool = True,
        foreach: bool | None = None,
    ) -> None:
        self.window_size = check_window_size(window_size)
        self.lamb = check_lamb(lamb)
        self.warmup = bool(check_bool("warmup", warmup))
        self.reduction = check_choice("reduction", reduction, ("mean", "sum"))
        super().__init__(params, skip_nonfinite=skip_nonfinite, foreach=foreach)

    def hparams(self) -> dict[str, Any]:
        return {"window_size": self.window_size, "lamb": self.lamb, "warmup": self.warmup, "reduction": self.reduction}

    def _init_state(self, grad: Tensor) -> dict[str, Any]:
        window = grad.new_zeros((self.window_size, *grad.shape))
        return {"window": window, "sum": torch.zeros_like(grad), "count": 0}

    def _check_loaded_hparams(self, hparams: dict[str, Any]) -> None:
        saved = hparams.get("window_size")
        if saved != self.window_size:
            raise ValueError(f"The state was saved with window_size={saved!r}; this filter has {self.window_size}.")

    def _check_loaded_entry(self, name: str, param: Tensor, entry: dict[str, Any]) -> None:
        _check_tensor(name, "window", entry.get("window"), (self.window_size, *param.shape))
        _check_tensor(name, "sum", entry.get("sum"), tuple(param.shape))
        count = entry.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"The state of {name!r} has an invalid 'count' {count!r}.")

    def _update(self, group: list[_Entry], foreach: bool, compute_stats: bool) -> tuple[Tensor, Tensor]:
        w = self.window_size
        states = [e.state for e in group]
        grads = [e.grad for e in group]
        sums = [st["sum"] for st in states]
        slots = [st["window"][st["count"] % w] for st in states]  # the oldest gradient, overwritten below
        full = [i for i, st in enumerate(states) if st["count"] >= w]
        if len(full) == len(group):
            leaving, leaving_sums = slots, sums
        else:
            leaving, leaving_sums = [slots[i] for i in full], [sums[i] for i in full]
        if foreach:
            if leaving:
                torch._foreach_sub_(leaving_sums, leaving)
            torch._foreach_add_(sums, grads)
            torch._foreach_copy_(slots, grads)
        else:
            for s, old in zip(leaving_sums, leaving):
                s.sub_(old)
            for s, slot, g in zip(sums, slots, grads):
                s.add_(g)
                slot.copy_(g)
        by_scale: dict[float, list[int]] = {}
        for i, e in enumerate(group):
            st = e.state
            st["count"] += 1
            if st["count"] % w == 0:  # the ring came round: drop the rounding of the running sum
                torch.sum(st["window"], dim=0, out=st["sum"])
            if self.warmup and st["count"] < w:
                continue
            scale = self.lamb / min(st["count"], w) if self.reduction == "mean" else self.lamb
            by_scale.setdefault(scale, []).append(i)
        dot = slow = _ZERO
        for scale, idx in by_scale.items():
            if len(idx) == len(group):
                g_sel, s_sel = grads, sums
            else:
                g_sel, s_sel = [grads[i] for i in idx], [sums[i] for i in idx]
            if compute_stats:
                dot = dot + scale * _dots(g_sel, s_sel).double().sum().cpu()
                slow = slow + (scale * _norms(s_sel, foreach).double()).square().sum().cpu()
            if scale == 0:
                continue
            if foreach:
                torch._foreach_add_(g_sel, s_sel, alpha=scale)
            else:
                for g, s in zip(g_sel, s_sel):
                    g.add_(s, alpha=scale)
        return dot, slow
