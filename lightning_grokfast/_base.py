"""What every gradient transform shares: the parameter registry, the non-finite check, the GradScaler hand-off,
the state dict and the memory check. Plain PyTorch; nothing here knows Lightning.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lightning_grokfast._validation import check_bool, check_optional_bool

Params = Union[Iterable[Tensor], Iterable[tuple[str, Tensor]]]
LOW_PRECISION = (torch.float16, torch.bfloat16)


def canonical_name(name: str) -> str:
    """A parameter name without the ``_orig_mod`` segment that ``torch.compile`` inserts, so that state keyed by it
    loads into the same model compiled or not."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


_NO_STATE: dict[str, Any] = {}  # an entry's state until it is attached; never written


class Entry:
    """One parameter taking part in a step: its name, the parameter, its gradient and its state."""

    __slots__ = ("grad", "name", "param", "state")

    def __init__(self, name: str, param: Tensor, grad: Tensor, state: dict[str, Any]) -> None:
        self.name = name
        self.param = param
        self.grad = grad
        self.state = state


def grouped(entries: list[Entry]) -> list[list[Entry]]:
    """Split entries by the gradient's (device, dtype), the unit a ``_foreach`` kernel works on."""
    groups: dict[tuple[torch.device, torch.dtype], list[Entry]] = {}
    for e in entries:
        groups.setdefault((e.grad.device, e.grad.dtype), []).append(e)
    return list(groups.values())


def norms(tensors: list[Tensor], foreach: bool) -> Tensor:
    """Per-tensor L2 norms, in float32 at least, stacked into one tensor."""
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    if foreach:
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype))
    return torch.stack([torch.linalg.vector_norm(t, dtype=dtype) for t in tensors])


def dots(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """Per-pair dot products ``<x, y>`` (float32 at least, one pass each), stacked into one float64 tensor.

    There is no multi-tensor dot kernel; one ``torch.dot`` per pair reads each tensor once and allocates
    nothing, which measured faster than any ``_foreach`` detour through products and norms.
    """
    return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(xs, ys)]).double()


def all_finite(tensors: list[Tensor]) -> bool:
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
    return bool(torch.isfinite(norms(tensors, True)).all())


def available_memory(device: torch.device) -> Optional[int]:
    """Free bytes on ``device``: free CUDA memory, or the RAM the OS reports available; ``None`` if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    """``n`` bytes as a short human-readable string."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"


def unscale_if_needed(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Unscale ``optimizer``'s gradients through ``scaler`` unless that already happened in this iteration.

    ``GradScaler.unscale_`` may run only once per optimizer and step; the scaler's per-optimizer record says
    whether it has. Its ``step`` then sees the gradients already unscaled and does not unscale them again.
    """
    if not scaler.is_enabled():
        return
    from torch.amp.grad_scaler import OptState

    record = scaler._per_optimizer_states[id(optimizer)]
    if record["stage"] is OptState.READY:
        scaler.unscale_(optimizer)
    elif record["stage"] is OptState.STEPPED:
        raise RuntimeError(
            "`step(scaler=..., optimizer=...)` was called after `scaler.step(optimizer)`: call it between "
            "`scaler.scale(loss).backward()` and `scaler.step(optimizer)`."
        )


class GradientTransform:
    """Base of the gradient transforms: which parameters, when to skip, the state and its checkpoint.

    A subclass implements :meth:`_apply` (transform the gradients of one step in place and return its
    statistics) and, if it keeps state, :meth:`_init_state` and :meth:`_check_loaded_entry`.

    Args:
        params: an iterable of parameters, or of ``(name, parameter)`` pairs such as ``model.named_parameters()``.
            Names key the state dict (without ``torch.compile``'s ``_orig_mod`` segment); plain parameters are named
            by position.
        skip_nonfinite: when a gradient to be transformed holds inf or NaN, leave the state and all gradients of that
            step untouched (a warning the first time, counted in :attr:`skipped_steps`).
        foreach: use the multi-tensor ``torch._foreach_*`` path (``None`` or ``True``) or a per-tensor loop
            (``False``).
    """

    kind: str = ""
    _wants_norms = False  # whether _apply needs the raw per-tensor norms on every step
    _stateful = True  # whether it keeps per-parameter state

    def __init__(self, params: Params, *, skip_nonfinite: bool = True, foreach: Optional[bool] = None) -> None:
        self.skip_nonfinite = check_bool("skip_nonfinite", skip_nonfinite)
        self.foreach = check_optional_bool("foreach", foreach)
        self.state: dict[str, dict[str, Any]] = {}
        self.skipped_steps = 0
        self._memory_checked = False
        self._restored = False  # state loaded since the last step: check where every tensor lives
        self._params: dict[str, Tensor] = {}
        self._names: dict[int, str] = {}
        self.set_parameters(params)

    # ------------------------------------------------------------------ parameters
    def set_parameters(self, params: Params) -> None:
        """(Re)register the parameters, keeping the state of every name that stays.

        Raises:
            ValueError: if ``params`` is empty, mixes named and plain parameters, or repeats a name.
        """
        items: list[Any] = list(params)
        if not items:
            raise ValueError("`params` is empty: the transform needs at least one parameter.")
        named = [isinstance(item, tuple) for item in items]
        if any(named) and not all(named):
            raise ValueError("`params` must be all tensors or all (name, tensor) pairs, not a mix.")
        pairs: list[tuple[str, Any]] = items if all(named) else [(str(i), p) for i, p in enumerate(items)]
        self._params, self._names = {}, {}
        for raw_name, p in pairs:
            name = canonical_name(raw_name)
            if not isinstance(p, Tensor):
                raise ValueError(f"`params` must hold tensors, got {type(p).__name__} for {name!r}.")
            if name in self._params:
                raise ValueError(f"`params` names {name!r} twice.")
            if id(p) in self._names:  # a tied parameter: transform it once, under its first name
                continue
            self._params[name] = p
            self._names[id(p)] = name

    def is_registered(self, param: Tensor) -> bool:
        """Whether ``param`` is one of the registered parameters."""
        return id(param) in self._names

    def numel(self) -> int:
        """Number of elements of the registered parameters."""
        return sum(p.numel() for p in self._params.values())

    def expected_state_bytes(self) -> int:
        """Bytes the state will hold once every registered parameter has had a gradient (0 for a stateless one)."""
        return 0

    def check_memory(self, device: Optional[torch.device] = None) -> None:
        """Refuse, before anything is allocated, a state that cannot fit in the memory free on ``device``.

        Args:
            device: where the state will live; default: the device of the first registered parameter.

        Raises:
            MemoryError: naming the state size, what it is made of and what to change.
        """
        needed = self.expected_state_bytes() - self.state_bytes()
        if needed <= 0:
            return
        device = device or next(iter(self._params.values())).device
        free = available_memory(device)
        if free is not None and needed > free:
            raise MemoryError(
                f"{self!r}: its state needs {format_bytes(needed)} for {self.numel():,} parameter values "
                f"({self._memory_rule()}), but only {format_bytes(free)} is free on {device}. {self._memory_advice()}"
            )

    def _memory_rule(self) -> str:
        return ""

    def _memory_advice(self) -> str:
        return ""

    def state_bytes(self) -> int:
        """Bytes held by the state now."""
        tensors = [v for s in self.state.values() for v in s.values() if isinstance(v, Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ step
    def step(
        self,
        params: Optional[Iterable[Tensor]] = None,
        *,
        compute_stats: bool = False,
        scaler: Optional[torch.amp.GradScaler] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
    ) -> Any:
        """Transform the gradients in place, once per optimizer step.

        Call it between ``loss.backward()`` and ``optimizer.step()``. With a ``torch.amp.GradScaler`` pass
        ``scaler`` and ``optimizer``: the gradients are unscaled through the scaler first, if they are not yet
        (the transform must never see scaled gradients).

        Args:
            params: the parameters to transform (for instance one optimizer's), all registered; default: all.
                Parameters whose ``.grad`` is ``None`` are skipped and keep their state.
            compute_stats: also compute the diagnostics of the returned statistics (costs extra reads).
            scaler: a GradScaler whose scaled gradients must be unscaled first.
            optimizer: the optimizer ``scaler`` will step; its parameters are the default ``params``.

        Returns:
            What the step did (the subclass's statistics).
        """
        if scaler is not None:
            if optimizer is None:
                raise ValueError("`scaler` needs `optimizer`: the GradScaler unscales one optimizer's gradients.")
            unscale_if_needed(scaler, optimizer)
        if params is None and optimizer is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
        if not self._memory_checked:
            self._memory_checked = True
            if not self.state:
                self.check_memory()  # before the first step allocates the state
        with torch.no_grad():
            entries = self._entries(params)
            if not entries:
                return self._stats(applied=False)
            groups = grouped(entries)
            foreach = [self.foreach if self.foreach is not None else not g[0].grad.is_complex() for g in groups]
            raw_norms: Optional[list[Tensor]] = None
            if compute_stats or self._wants_norms:  # the norms serve the non-finite check too
                raw_norms = [norms([e.grad for e in g], fe) for g, fe in zip(groups, foreach)]
                finite = all(bool(torch.isfinite(n).all()) for n in raw_norms)
            else:
                finite = not self.skip_nonfinite or all(all_finite([e.grad for e in g]) for g in groups)
            if self.skip_nonfinite and not finite:
                self._on_nonfinite(next((e.name for e in entries if not bool(torch.isfinite(e.grad).all())), None))
                return self._stats(applied=False, skipped_nonfinite=True)
            if self._stateful:
                for group in groups:
                    self._attach_state(group)
                self._restored = False
            return self._apply(groups, foreach, raw_norms, compute_stats)

    def _entries(self, params: Optional[Iterable[Tensor]]) -> list[Entry]:
        if params is None:
            pairs = list(self._params.items())
        else:
            pairs = []
            for p in params:
                name = self._names.get(id(p))
                if name is None:
                    raise ValueError(
                        f"A parameter of shape {tuple(p.shape)} passed to `step` is not registered with this "
                        f"{type(self).__name__}."
                    )
                pairs.append((name, p))
        entries = []
        for name, p in pairs:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise ValueError(f"Parameter {name!r} has a sparse gradient; {type(self).__name__} needs dense ones.")
            entries.append(Entry(name, p, g, _NO_STATE))
        return entries

    def _attach_state(self, group: list[Entry]) -> None:
        """Give each entry of one (device, dtype) group its state: created at the parameter's first gradient, or
        moved to the gradient's device and the state dtype after a load, or when the first one shows the model
        was moved."""
        grad = group[0].grad
        device, dtype = grad.device, self.state_dtype(grad.dtype)
        check = self._restored
        for i, e in enumerate(group):
            state = self.state.get(e.name)
            if state is None:
                state = self.state[e.name] = self._init_state(e.grad)
            elif check or i == 0:
                for key, value in state.items():
                    if isinstance(value, Tensor) and (value.device != device or value.dtype != dtype):
                        state[key], check = value.to(device=device, dtype=dtype), True
            e.state = state

    def state_dtype(self, grad_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the state kept for gradients of ``grad_dtype``."""
        return grad_dtype

    def _on_nonfinite(self, name: Optional[str]) -> None:
        """Warn at the first skipped step; ``name`` is ``None`` when every value is finite but a norm overflows."""
        if self.skipped_steps == 0:
            what = (
                f"the gradient of {name!r} holds inf or NaN"
                if name is not None
                else "the gradients are finite, but their norm overflows their dtype"
            )
            warnings.warn(
                f"{type(self).__name__}: {what}; this step was skipped, the state "
                "and the gradients left as they were. Further skips are counted in `skipped_steps` without a "
                "warning.",
                RuntimeWarning,
                stacklevel=4,
            )
        self.skipped_steps += 1

    # ------------------------------------------------------------------ subclass hooks
    def _init_state(self, grad: Tensor) -> dict[str, Any]:
        return {}

    def _stats(self, applied: bool, skipped_nonfinite: bool = False) -> Any:
        raise NotImplementedError

    def _apply(
        self, groups: list[list[Entry]], foreach: list[bool], raw_norms: Optional[list[Tensor]], compute_stats: bool
    ) -> Any:
        raise NotImplementedError

    def hparams(self) -> dict[str, Any]:
        """The settings, as stored in the state dict."""
        return {}

    def _check_loaded_entry(self, name: str, param: Tensor, entry: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The whole state, keyed by parameter name: tensors, numbers and strings only.

        The tensors are references to the live state, as in ``torch.optim``; copy them to keep a snapshot.
        """
        return {
            "kind": self.kind,
            "hparams": self.hparams(),
            "skipped_steps": self.skipped_steps,
            "state": {name: dict(s) for name, s in self.state.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`: the tensors are copied onto the parameters' devices.

        Raises:
            ValueError: if the state is of another transform or configuration (another MA window), names unknown
                parameters, holds tensors of other shapes or holds inf or NaN. Nothing is changed then.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "kind" not in state_dict:
            raise ValueError("Not a gradient filter state dict (expected the keys 'kind', 'hparams' and 'state').")
        if state_dict["kind"] != self.kind:
            raise ValueError(f"The state is of the {state_dict['kind']!r} filter; this filter is {self.kind!r}.")
        self._check_loaded_hparams(dict(state_dict.get("hparams", {})))
        loaded = {canonical_name(name): entry for name, entry in state_dict["state"].items()}
        unknown = sorted(set(loaded) - set(self._params))
        if unknown:
            shown = ", ".join(repr(n) for n in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ValueError(
                f"The state names {len(unknown)} parameter(s) this filter does not have: {shown}. "
                "Was it saved from another model?"
            )
        for name, entry in loaded.items():
            self._check_loaded_entry(name, self._params[name], entry)
            for key, value in entry.items():
                if isinstance(value, Tensor) and not bool(torch.isfinite(value).all()):
                    raise ValueError(
                        f"The state of {name!r} holds inf or NaN in {key!r}; it would corrupt every later step. "
                        "Resume from an earlier checkpoint."
                    )
        self.state = {
            name: {
                k: v.detach().to(self._params[name].device, copy=True) if isinstance(v, Tensor) else v
                for k, v in entry.items()
            }
            for name, entry in loaded.items()
        }
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self._restored = True

    def _check_loaded_hparams(self, hparams: dict[str, Any]) -> None:
        """Refuse state that this configuration cannot continue from."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"


def check_tensor(name: str, key: str, value: Any, shape: tuple[int, ...]) -> None:
    """Refuse a loaded state entry that is not a tensor of ``shape``."""
    if not isinstance(value, Tensor):
        raise ValueError(f"The state of {name!r} has no tensor {key!r}.")
    if tuple(value.shape) != shape:
        raise ValueError(
            f"The state of {name!r} holds {key!r} of shape {tuple(value.shape)}, but this filter expects {shape}."
        )


def safe_div(num: float, den: float) -> Optional[float]:
    """``num / den``, or ``None`` when ``den`` is 0 or not finite."""
    return num / den if den > 0 and math.isfinite(den) else None
