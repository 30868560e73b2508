"""The gradient transform: its parameters, its step, where its state lives and how it is saved. Plain PyTorch.

A step reads as the algorithm:

1. **gather** the registered parameters that have a gradient into groups of one device and dtype (the unit a
   ``torch._foreach_*`` kernel takes), leaving out gradients that nothing wrote since this transform did;
2. **prepare** what the subclass needs from the raw gradients before it writes (norms, dot products);
3. **decide** whether every gradient is finite (:func:`nonfinite`), and skip the whole step if not;
4. **place** the state next to the gradients (created at a parameter's first gradient, moved after a load);
5. **apply** the subclass's arithmetic to each group in place, and report what it did.

A subclass sets ``settings_type``, implements ``_apply`` (and ``_prepare``, ``_init_state``, ``_check_entry`` if
it needs them) and ``_single_tensor_*`` / ``_multi_tensor_*`` / ``_fused_*`` functions of one signature, one of
which :meth:`GradientTransform._path` chooses per group.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Optional, TypeVar, Union

import torch
from torch import Tensor

from lightning_grokfast import _fused
from lightning_grokfast._sharded import Sharding, is_sharded, local, sharding_of
from lightning_grokfast.settings import Settings

Params = Union[Iterable[Tensor], Iterable[tuple[str, Tensor]]]
S = TypeVar("S", bound=Settings)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: float32 for 16-bit gradients, their own dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def canonical_name(name: str) -> str:
    """A parameter name without the segments wrappers insert (``torch.compile``'s ``_orig_mod``, Fabric's
    ``_forward_module``), so that state keyed by it loads into the same model wrapped or not."""
    return ".".join(part for part in name.split(".") if part not in ("_orig_mod", "_forward_module"))


def available_memory(device: torch.device) -> Optional[int]:
    """Free bytes on ``device``: free CUDA memory, or the RAM the OS reports available; ``None`` if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
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


OVERFLOW = "<overflow>"  # what nonfinite() returns for finite values whose norm overflows
ELSEWHERE = "<another rank>"  # a sharded step's non-finite value in another rank's piece


LARGE = 2**17  # elements from which a tensor's sum is cheaper to read than the GradScaler kernel (CPU, measured)


def _looks_finite(grads: list[Tensor]) -> bool:
    """``True`` when no gradient holds inf or NaN, in one read of each: the GradScaler's kernel for small tensors (one
    call, no result tensor per gradient; it multiplies by 1.0 in place, which leaves every value, NaN included, bit
    for bit), a read-only sum for large ones. ``False`` may also mean that a sum of finite values overflowed."""
    small, large = [g for g in grads if g.numel() < LARGE], [g for g in grads if g.numel() >= LARGE]
    if small:
        found = torch.zeros(1, device=small[0].device)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(small, found, torch.ones(1, device=found.device))
        except (RuntimeError, NotImplementedError):  # a device or dtype without the kernel
            large = grads
        else:
            if bool(found):
                return False
    return not large or bool(torch.isfinite(torch.stack([g.sum(dtype=compute_dtype(g.dtype)) for g in large])).all())


def nonfinite(grads: list[Tensor], names: list[str], sq_norms: Optional[Tensor] = None) -> Optional[str]:
    """``None`` when every gradient is finite and usable; else the name of one that holds inf or NaN, or
    :data:`OVERFLOW` when all values are finite but a squared norm the transform needs overflows.

    Given the squared norms a transform computed anyway, those decide (no further read); otherwise one read of the
    gradients (:func:`_looks_finite`). Only a step that looks bad scans the gradients for the name.
    """
    if sq_norms is not None:
        usable = torch.isfinite(sq_norms)
        if compute_dtype(grads[0].dtype) == torch.float32:  # and a norm the arithmetic can hold
            usable &= sq_norms <= torch.finfo(torch.float32).max ** 2
        if bool(usable.all()):
            return None
    elif _looks_finite(grads):
        return None
    bad = next((n for n, g in zip(names, grads) if not bool(torch.isfinite(g).all())), None)
    return bad if bad is not None or sq_norms is None else OVERFLOW  # a sum's overflow is no reason to skip


def unscale_if_needed(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Unscale ``optimizer``'s gradients through ``scaler`` unless that already happened in this iteration.

    ``GradScaler.unscale_`` may run once per optimizer and step; the scaler's per-optimizer record says whether it
    has, and its ``step`` then does not unscale again.
    """
    if not scaler.is_enabled():
        return
    from torch.amp.grad_scaler import OptState

    stage = scaler._per_optimizer_states[id(optimizer)]["stage"]
    if stage is OptState.READY:
        scaler.unscale_(optimizer)
    elif stage is OptState.STEPPED:
        raise RuntimeError(
            "`step(scaler=..., optimizer=...)` was called after `scaler.step(optimizer)`: call it between "
            "`scaler.scale(loss).backward()` and `scaler.step(optimizer)`."
        )


def _unwrap(optimizer: Any, scaler: Any) -> tuple[torch.optim.Optimizer, Any]:
    """The torch optimizer inside a Lightning Fabric or ``LightningOptimizer`` wrapper (both pose as the optimizer's
    class and hold it in ``_optimizer``), and, unless ``scaler`` is given, the GradScaler of the wrapper's precision,
    whose scaled gradients ``fabric.backward`` and ``manual_backward`` leave under ``"16-mixed"``."""
    strategy, inner = getattr(optimizer, "_strategy", None), getattr(optimizer, "_optimizer", None)
    if strategy is None or not isinstance(inner, torch.optim.Optimizer):
        return optimizer, scaler
    if scaler is None:
        precision = getattr(strategy, "precision", None) or getattr(strategy, "precision_plugin", None)
        scaler = getattr(precision, "scaler", None)
    return inner, scaler


@dataclass
class Group:
    """The parameters of one step whose gradients share a device and dtype, with their state (parallel lists)."""

    names: list[str] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)  # this rank's pieces, when sharded
    grads: list[Tensor] = field(default_factory=list)  # likewise
    states: list[dict[str, Any]] = field(default_factory=list)
    weights: Optional[Tensor] = None  # sharded: 1 / replicas of each piece, so that a sum over ranks counts it once
    path: str = "multi"  # the implementation that updates it: "single" (per tensor), "multi" (foreach) or "fused"

    def state(self, key: str) -> list[Any]:
        """One state entry of every parameter, in order."""
        return [s[key] for s in self.states]


class GradientTransform(Generic[S]):
    """A gradient transform: call :meth:`step` between ``backward()`` and ``optimizer.step()``.

    Args:
        params: an iterable of parameters, or of ``(name, parameter)`` pairs such as ``model.named_parameters()``.
            Names key the state dict (without ``torch.compile``'s ``_orig_mod`` segment); plain parameters are named
            by position. A parameter listed twice (tied weights) is transformed once, under its first name.
        settings: the transform's settings (see :mod:`lightning_grokfast.settings`).
    """

    settings_type: ClassVar[type[Settings]]

    def __init__(self, params: Params, settings: S) -> None:
        if not isinstance(settings, self.settings_type):
            expected, got = self.settings_type.__name__, type(settings).__name__
            raise TypeError(f"{type(self).__name__} takes {expected}, got {got}.")
        self.settings: S = settings
        self.state: dict[str, dict[str, Any]] = {}
        self.skipped_steps = 0  # steps skipped because a gradient held inf or NaN
        self.repeated_steps = 0  # steps that found gradients this transform had already transformed
        self._mark = f"_grokfast_{id(self)}"  # the attribute a transformed gradient carries: its version then
        self._memory_checked = False
        self._unplaced = False  # loaded state, not yet moved next to the gradients
        self.set_parameters(params)

    @classmethod
    def from_settings(cls, params: Params, settings: Settings) -> GradientTransform[Any]:
        """The transform of ``settings`` over ``params`` (what the callbacks build)."""
        transform = cls.__new__(cls)
        GradientTransform.__init__(transform, params, settings)  # type: ignore[misc]  # S is settings' type
        return transform

    # ------------------------------------------------------------------ parameters
    def set_parameters(self, params: Params) -> None:
        """(Re)register the parameters, keeping the state of every name that stays.

        Raises:
            ValueError: if ``params`` is empty, mixes named and plain parameters, repeats a name or holds no tensor.
        """
        items: list[Any] = list(params)
        if not items:
            raise ValueError("`params` is empty: the transform needs at least one parameter.")
        named = [isinstance(item, tuple) for item in items]
        if any(named) and not all(named):
            raise ValueError("`params` must be all tensors or all (name, tensor) pairs, not a mix.")
        pairs: list[tuple[str, Any]] = items if all(named) else [(str(i), p) for i, p in enumerate(items)]
        self._params: dict[str, Tensor] = {}
        self._names: dict[int, str] = {}
        for raw_name, p in pairs:
            name = canonical_name(raw_name)
            if not isinstance(p, Tensor):
                raise ValueError(f"`params` must hold tensors, got {type(p).__name__} for {name!r}.")
            if name in self._params:
                raise ValueError(f"`params` names {name!r} twice.")
            if id(p) not in self._names and self._selects(p):
                self._params[name] = p
                self._names[id(p)] = name
        self._all = {id(p) for _, p in pairs}  # registered, whether this transform selects them or not
        self._sharding: Optional[Sharding] = sharding_of(self._params)  # DTensor parameters: their mesh

    def is_registered(self, param: Tensor) -> bool:
        """Whether ``param`` is one of the registered parameters."""
        return id(param) in self._all

    def numel(self) -> int:
        """Number of elements of the parameters this transform acts on (of their pieces on this rank, when sharded)."""
        return sum(local(p).numel() for p in self._params.values())

    def _selects(self, param: Tensor) -> bool:
        """Whether this transform acts on ``param`` at all (⊥Grad's ``apply_to``)."""
        return True

    # ------------------------------------------------------------------ memory
    def expected_state_bytes(self) -> int:
        """Bytes the state will hold once every parameter has had a gradient (0 for a stateless transform)."""
        return 0

    def state_bytes(self) -> int:
        """Bytes held by the state now."""
        tensors = [v for entry in self.state.values() for v in entry.values() if isinstance(v, Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def check_memory(self, device: Optional[torch.device] = None) -> None:
        """Refuse, before anything is allocated, a state that cannot fit in the memory free on ``device``.

        Args:
            device: where the state will live; default: the device of the first parameter.

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
                f"{self!r}: its state needs {format_bytes(needed)} ({self._memory_rule()}), but only "
                f"{format_bytes(free)} is free on {device}. {self._memory_advice()}"
            )

    def _memory_rule(self) -> str:
        return ""

    def _memory_advice(self) -> str:
        return ""

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

        Call it between ``loss.backward()`` and ``optimizer.step()``, on unscaled gradients. With a
        ``torch.amp.GradScaler``, pass ``scaler`` and ``optimizer``: the gradients are unscaled through the scaler
        first, unless ``scaler.unscale_(optimizer)`` already ran. Called before unscaling without them, the
        transform would work on scaled gradients, which is wrong from the scaler's first change of scale.

        Args:
            params: the parameters to transform (for instance one optimizer's), all registered; default: all.
                Parameters whose ``.grad`` is ``None`` are left out and keep their state; so are gradients that
                nothing wrote since this transform last transformed them (counted in ``repeated_steps``).
            compute_stats: also compute the diagnostics of the returned statistics (costs extra reads).
            scaler: a GradScaler whose scaled gradients must be unscaled first.
            optimizer: the optimizer ``scaler`` will step; its parameters are the default ``params``.

        Returns:
            What the step did (the subclass's statistics).
        """
        if optimizer is not None:
            optimizer, scaler = _unwrap(optimizer, scaler)
            if scaler is not None:
                unscale_if_needed(scaler, optimizer)
            if params is None:
                params = [p for group in optimizer.param_groups for p in group["params"]]
        elif scaler is not None:
            raise ValueError("`scaler` needs `optimizer`: the GradScaler unscales one optimizer's gradients.")
        if not self._memory_checked:
            if not self.state:
                self.check_memory()  # before the first step allocates the state
            self._memory_checked = True
        with torch.no_grad():
            groups = self._gather(params)
            if not groups:
                return self._stats(applied=False)
            prepared = [self._prepare(g, compute_stats) for g in groups]
            reason = None
            if self.settings.skip_nonfinite:
                bad = [nonfinite(g.grads, g.names, p.get("sq_norms")) for g, p in zip(groups, prepared)]
                reason = next((b for b in bad if b is not None), None)
            if self._sharding is not None:
                reason = self._agree(groups, prepared, reason)
            if reason is not None:
                self._on_nonfinite(reason)
                return self._stats(applied=False, skipped_nonfinite=True)
            if self._unplaced:  # the first step since a load
                self._check_fresh(groups)
            for g in groups:
                self._place(g)
            self._unplaced = False
            stats = self._apply(groups, prepared, compute_stats)
            self.mark_transformed(grad for g in groups for grad in g.grads)
            return stats

    def mark_transformed(self, grads: Iterable[Tensor]) -> None:
        """Note that ``grads`` are transformed as they are now: a later :meth:`step` leaves each alone until something
        writes it (a backward, ``zero_grad``, clipping). The callbacks call it again after the optimizer step, so that
        what clipping or another transform wrote after this one counts as transformed too."""
        mark = self._mark
        for g in grads:
            g = local(g) if self._sharding is not None else g  # the piece _gather reads
            setattr(g, mark, g._version)

    def _gather(self, params: Optional[Iterable[Tensor]]) -> list[Group]:
        """The parameters to transform with their gradients, grouped by the gradients' device and dtype."""
        if params is None:
            pairs: Iterable[tuple[str, Tensor]] = self._params.items()
        else:
            pairs = [(self._name_of(p), p) for p in params]
        groups: dict[tuple[torch.device, torch.dtype], Group] = {}
        repeated, mark, sharded = [], self._mark, self._sharding is not None
        for name, p in pairs:
            g = p.grad
            if g is None or not name:
                continue
            if sharded:
                p, g = local(p), local(g)
            if getattr(g, mark, None) == g._version:
                repeated.append(name)
                continue
            if g.is_sparse:
                raise ValueError(f"Parameter {name!r} has a sparse gradient; {type(self).__name__} needs dense ones.")
            group = groups.get((g.device, g.dtype))
            if group is None:
                group = groups[(g.device, g.dtype)] = Group()
            group.names.append(name)
            group.params.append(p)
            group.grads.append(g)
        if repeated:
            self._on_repeated(repeated)
        for group in groups.values():
            group.path = self._path(group.grads[0].device)
            if self._sharding is not None:
                group.weights = self._sharding.weights(group.names, group.grads[0].device)
        return list(groups.values())

    def _path(self, device: torch.device) -> str:
        """The implementation the settings choose for gradients on ``device``: ``fused=None`` is the path of
        ``foreach``, unless the environment variable ``LIGHTNING_GROKFAST_FUSED=1`` asks for fused kernels where they
        can be built."""
        fused = self.settings.fused
        if fused or (fused is None and os.environ.get("LIGHTNING_GROKFAST_FUSED") == "1"):
            reason = _fused.unavailable(device)
            if reason is None:
                return "fused"
            if fused:
                raise RuntimeError(f"{type(self).__name__}(fused=True): {reason}. Use fused=False or None.")
        return "single" if self.settings.foreach is False else "multi"

    def _agree(self, groups: list[Group], prepared: list[dict[str, Any]], reason: Optional[str]) -> Optional[str]:
        """Sharded: add up every rank's partial reductions (in place in ``prepared``) and its non-finite verdict, in
        one all-reduce, so that every rank decides and computes as one process would."""
        assert self._sharding is not None
        device = groups[0].grads[0].device
        keys = [(i, k) for i, pre in enumerate(prepared) for k in sorted(pre) if isinstance(pre[k], Tensor)]
        flags = [float(reason is not None and reason != OVERFLOW), float(reason == OVERFLOW)]
        parts = [torch.tensor(flags, dtype=torch.float64, device=device)]
        parts += [prepared[i][k].to(device, torch.float64) * groups[i].weights.to(device) for i, k in keys]  # type: ignore[union-attr]
        total = torch.split(self._sharding.sum(torch.cat(parts)), [len(p) for p in parts])
        for (i, k), value in zip(keys, total[1:]):
            prepared[i][k] = value.to(prepared[i][k].device)
        bad, overflow = total[0].tolist()
        if bad:
            return reason if reason not in (None, OVERFLOW) else ELSEWHERE
        return OVERFLOW if overflow else None

    def _name_of(self, param: Tensor) -> str:
        """The name of a registered parameter; ``""`` for one registered but not selected."""
        name = self._names.get(id(param))
        if name is None:
            if id(param) in self._all:
                return ""
            raise ValueError(
                f"A parameter of shape {tuple(param.shape)} passed to `step` is not registered with this "
                f"{type(self).__name__}."
            )
        return name

    def _place(self, group: Group) -> None:
        """Give every parameter of ``group`` its state, next to its gradient: made at its first gradient, moved
        there after a load (or when the group's first state shows that the model was moved)."""
        group.states = [self.state.get(n) or self._init_state(n, g) for n, g in zip(group.names, group.grads)]
        device, dtype = group.grads[0].device, self._state_dtype(group.grads[0].dtype)

        def elsewhere(entry: dict[str, Any]) -> bool:
            return any(isinstance(v, Tensor) and (v.device != device or v.dtype != dtype) for v in entry.values())

        if self._unplaced or elsewhere(group.states[0]):
            for entry in group.states:
                for key, value in entry.items():
                    if isinstance(value, Tensor):
                        entry[key] = value.to(device=device, dtype=dtype)

    def _check_fresh(self, groups: list[Group]) -> None:
        """Warn when parameters that have a gradient found no state in what was loaded."""
        fresh = [n for g in groups for n in g.names if n not in self.state]
        if fresh and self.expected_state_bytes():
            shown = ", ".join(repr(n) for n in fresh[:5]) + (f" and {len(fresh) - 5} more" if len(fresh) > 5 else "")
            warnings.warn(
                f"{type(self).__name__}: the loaded state has no entry for {shown}, which have a gradient now; their "
                "state starts fresh from this step. A parameter trained before the state was saved has an entry: was "
                "the state saved from another model, or edited? (One frozen until now rightly has none.)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _on_nonfinite(self, reason: str) -> None:
        """Warn at the first skipped step (later ones are counted only)."""
        if self.skipped_steps == 0:
            what = {
                OVERFLOW: "the gradients are finite, but their norm overflows their dtype",
                ELSEWHERE: "another rank's piece of a gradient holds inf or NaN",
            }.get(reason, f"the gradient of {reason!r} holds inf or NaN")
            warnings.warn(
                f"{type(self).__name__}: {what}; this step was skipped, the state and the gradients left as they "
                "were. Further skips are counted in `skipped_steps` without a warning.",
                RuntimeWarning,
                stacklevel=4,
            )
        self.skipped_steps += 1

    def _on_repeated(self, names: list[str]) -> None:
        """Warn the first time a step finds gradients that nothing wrote since this transform transformed them."""
        if self.repeated_steps == 0:
            shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            warnings.warn(
                f"{type(self).__name__}: the gradient of {shown} is the one it already transformed (nothing wrote it "
                "since: no backward, no zero_grad), so it is left as it is and kept out of the state. This happens "
                "when an optimizer steps twice on one backward, as in the batch-norm epoch of "
                "StochasticWeightAveraging. Further such steps are counted in `repeated_steps` without a warning.",
                RuntimeWarning,
                stacklevel=5,
            )
        self.repeated_steps += 1

    # ------------------------------------------------------------------ what a subclass implements
    def _state_dtype(self, grad_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the state kept for gradients of ``grad_dtype``."""
        return grad_dtype

    def _init_state(self, name: str, grad: Tensor) -> dict[str, Any]:
        """Create, register and return the state of ``name`` at its first gradient ``grad``."""
        raise NotImplementedError

    def _prepare(self, group: Group, compute_stats: bool) -> dict[str, Tensor]:
        """Reductions of the raw gradients needed before anything is written. A ``"sq_norms"`` entry (per-tensor
        squared L2 norms, float64) also decides finiteness."""
        return {}

    def _apply(self, groups: list[Group], prepared: list[dict[str, Tensor]], compute_stats: bool) -> Any:
        raise NotImplementedError

    def _stats(self, applied: bool, skipped_nonfinite: bool = False) -> Any:
        raise NotImplementedError

    def _check_entry(self, name: str, param: Tensor, entry: dict[str, Any]) -> None:
        """Refuse a loaded state entry that does not fit ``param``."""

    # ------------------------------------------------------------------ state dict
    def state_dict(self, full_state_dict: bool = False) -> dict[str, Any]:
        """The whole state, keyed by parameter name: tensors, numbers and strings only (loads with
        ``weights_only=True``). The tensors are the live state, as in ``torch.optim``; copy them to keep a snapshot.

        Args:
            full_state_dict: with sharded (DTensor) parameters, ``False`` gives each state tensor as a DTensor of this
                rank's piece (what ``torch.distributed.checkpoint`` saves shard by shard), ``True`` gathers each whole
                onto CPU, on every rank (a collective: every rank calls it). Without sharded parameters both give
                the tensors themselves.
        """
        state: dict[str, Any] = {name: dict(entry) for name, entry in self.state.items()}
        if self._sharding is not None:
            convert = self._sharding.whole if full_state_dict else self._sharding.dtensor
            state = {
                name: {k: convert(name, v) if isinstance(v, Tensor) else v for k, v in state[name].items()}
                for name in sorted(state)  # one order on every rank: gathering is a collective
            }
        return {"kind": self.settings.kind, "hparams": self.settings.describe(), "skipped_steps": self.skipped_steps,
                "state": state}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (a copy of it; it moves next to the gradients at the next step).

        Raises:
            ValueError: if the state is of another transform or configuration (another MA window), names unknown
                parameters, holds tensors of other shapes or holds inf or NaN. Nothing is changed then.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "kind" not in state_dict:
            raise ValueError("Not a gradient transform state dict (expected the keys 'kind', 'hparams' and 'state').")
        mismatch = self.settings.mismatch(state_dict["kind"], state_dict.get("hparams", {}))
        if mismatch:
            raise ValueError(mismatch[0].upper() + mismatch[1:] + ".")
        loaded = {  # a sharded state as a whole: gathering is a collective, called in one order everywhere
            canonical_name(name): {k: v.full_tensor() if is_sharded(v) else v for k, v in entry.items()}
            for name, entry in sorted(state_dict["state"].items())
        }
        unknown = sorted(set(loaded) - set(self._params))
        if unknown:
            shown = ", ".join(repr(n) for n in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ValueError(
                f"The state names {len(unknown)} parameter(s) this transform does not have: {shown}. "
                "Was it saved from another model?"
            )
        for name, entry in loaded.items():
            self._check_entry(name, self._params[name], entry)
            for key, value in entry.items():
                if isinstance(value, Tensor) and not bool(torch.isfinite(value).all()):
                    raise ValueError(
                        f"The state of {name!r} holds inf or NaN in {key!r}; it would corrupt every later step. "
                        "Resume from an earlier checkpoint."
                    )
        self.state = {
            name: {k: self._own(name, v) if isinstance(v, Tensor) else v for k, v in entry.items()}
            for name, entry in loaded.items()
        }
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self._unplaced = True

    def _own(self, name: str, value: Tensor) -> Tensor:
        """A copy of a loaded state tensor of ``name``: this rank's piece of it, when sharded."""
        return value.detach().clone() if self._sharding is None else self._sharding.piece(name, value.detach())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in self.settings.describe().items()) + ")"


def check_tensor(name: str, key: str, value: Any, shape: tuple[int, ...]) -> None:
    """Refuse a loaded state entry that is not a tensor of ``shape``."""
    if not isinstance(value, Tensor):
        raise ValueError(f"The state of {name!r} has no tensor {key!r}.")
    if tuple(value.shape) != shape:
        raise ValueError(
            f"The state of {name!r} holds {key!r} of shape {tuple(value.shape)}, but this transform expects {shape}."
        )
