"""The Lightning callbacks: thin glue around the plain-PyTorch transforms of `filters` and `orthograd`."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.xla import XLAStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_grokfast._base import GradientTransform, format_bytes
from lightning_grokfast._validation import (
    check_alpha,
    check_bool,
    check_choice,
    check_lamb,
    check_optional_bool,
    check_window_size,
)
from lightning_grokfast.filters import EMAFilter, FilterStats, MAFilter
from lightning_grokfast.orthograd import APPLY_TO, OrthoGrad, OrthoGradStats

_DEFAULT_LAMB = {"ema": 2.0, "ma": 5.0}
# Gradients are sharded or not materialised where Lightning calls `on_before_optimizer_step`.
_UNSUPPORTED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, XLAStrategy)


def _logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether this step's metrics reach the loggers (every ``log_every_n_steps``), so that costly diagnostics are
    computed only then. Lightning keeps that decision in a private attribute and offers no public one."""
    return bool(trainer.loggers) and bool(trainer._logger_connector.should_update_logs)


def _transform_callbacks(trainer: pl.Trainer) -> list[_TransformCallback]:
    """The Trainer's transform callbacks, in the order it calls them."""
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's connector
    return [cb for cb in callbacks if isinstance(cb, _TransformCallback)]


def _fmt(name: str, config: dict[str, Any]) -> str:
    return f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in config.items()) + ")"


class _TransformCallback(Callback):
    """What both callbacks share: strategy and stacking checks, the one order of the transforms, logging, state.

    Every transform callback of a Trainer runs from the hook of the first one listed, in the order of
    ``_chain_order`` (the Grokfast filter on the raw gradients, then ⊥Grad on its result), whatever the order
    in which they are listed.
    """

    _chain_order: ClassVar[int]
    _prefix: ClassVar[str]

    def __init__(self, log_diagnostics: bool, skip_nonfinite: bool, foreach: Optional[bool]) -> None:
        self.log_diagnostics = check_bool("log_diagnostics", log_diagnostics)
        self.skip_nonfinite = check_bool("skip_nonfinite", skip_nonfinite)
        self.foreach = check_optional_bool("foreach", foreach)
        self._transform: Optional[GradientTransform] = None
        self._module: Optional[pl.LightningModule] = None
        self._pending: Optional[dict[str, Any]] = None
        self._chain: list[_TransformCallback] = [self]
        self._foreign: set[int] = set()  # ids of optimizer tensors that are not parameters of the module

    # ------------------------------------------------------------------ to implement
    def config(self) -> dict[str, Any]:
        """The settings that shape the transform (for messages and the saved state)."""
        raise NotImplementedError

    def _make(self, pl_module: pl.LightningModule) -> GradientTransform:
        raise NotImplementedError

    def _diagnostics(self, stats: Any) -> dict[str, Optional[float]]:
        raise NotImplementedError

    @property
    def transform(self) -> Optional[GradientTransform]:
        """The plain-PyTorch transform (``None`` until the first fit sets it up)."""
        return self._transform

    def __repr__(self) -> str:
        return _fmt(type(self).__name__, self.config())

    # ------------------------------------------------------------------ hooks, in call order
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        name = type(self).__name__
        if isinstance(trainer.strategy, _UNSUPPORTED_STRATEGIES):
            raise ValueError(
                f"{name} does not support {type(trainer.strategy).__name__}: its gradients are sharded or not "
                "materialised where Lightning calls `on_before_optimizer_step`, so the transform would be wrong or "
                "a silent no-op. Supported: single device (CPU, CUDA, MPS) and the DDP family ('ddp', "
                "'ddp_spawn', 'ddp_fork', 'ddp_notebook', any number of nodes)."
            )
        transforms = _transform_callbacks(trainer)
        twins = [cb for cb in transforms if cb._chain_order == self._chain_order]
        if len(twins) > 1:
            listed = " and ".join(repr(cb) for cb in twins)
            raise ValueError(
                f"The Trainer holds {len(twins)} {name}s: {listed}. Stacked, each would transform the gradients "
                "the one before already transformed, and build its state from them. Keep one. From the "
                f"LightningCLI, `--trainer.callbacks+={type(self).__module__.split('.')[0]}.{name}` adds one to those "
                "a YAML config already lists: set its arguments in the YAML, or replace the whole list with "
                "`--trainer.callbacks=[...]`."
            )
        self._chain = sorted(transforms, key=lambda cb: cb._chain_order)
        if self._module is not pl_module:
            self._transform = None  # another model: start afresh
        self._build(pl_module)
        assert self._transform is not None
        nbytes = self._transform.expected_state_bytes()
        if nbytes:
            rank_zero_info(
                f"{self!r}: its state will hold {format_bytes(nbytes)} for {self._transform.numel():,} parameter "
                "values."
            )
            self._transform.check_memory(trainer.strategy.root_device)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        first = next(iter(_transform_callbacks(trainer)), self)
        if first is not self:
            return  # the first transform callback listed runs every one, in their one order
        logging = _logs_this_step(trainer)
        for cb in self._chain:
            cb._step(trainer, pl_module, optimizer, logging)

    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, logging: bool) -> None:
        transform = self._transform if self._transform is not None else self._build(pl_module)
        params = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in self._foreign]
        if not all(transform.is_registered(p) for p in params):
            transform = self._build(pl_module)  # parameters replaced since the fit started
            known = [p for p in params if transform.is_registered(p)]
            if len(known) < len(params):
                self._foreign.update(id(p) for p in params if not transform.is_registered(p))
                rank_zero_warn(
                    f"{type(self).__name__}: {len(params) - len(known)} tensor(s) in the optimizer are not parameters "
                    "of the LightningModule; they are stepped untransformed."
                )
            params = known
        stats = transform.step(params, compute_stats=logging and self.log_diagnostics)
        if not logging:
            return
        values = {f"{self._prefix}/skipped_steps": float(transform.skipped_steps)}
        if self.log_diagnostics:  # NaN where undefined (a skipped step): loggers repeat a key that is not logged
            values.update(
                {f"{self._prefix}/{k}": math.nan if v is None else v for k, v in self._diagnostics(stats).items()}
            )
        if len(trainer.optimizers) > 1:
            index = next(i for i, opt in enumerate(trainer.optimizers) if opt is optimizer)
            values = {f"{k}_opt{index}": v for k, v in values.items()}
        pl_module.log_dict(values, on_step=True, on_epoch=False)

    def _build(self, pl_module: pl.LightningModule) -> GradientTransform:
        """Create the transform over ``pl_module``'s parameters, or re-register them, keeping the state."""
        if self._transform is not None and self._module is pl_module:
            self._transform.set_parameters(pl_module.named_parameters())
            return self._transform
        self._transform, self._module = self._make(pl_module), pl_module
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._load(state)
        return self._transform

    # ------------------------------------------------------------------ checkpoint
    def _load(self, state: dict[str, Any]) -> None:
        if self._transform is None:
            self._pending = state  # loaded before any fit: applied when the transform is built
            return
        try:
            self._transform.load_state_dict(state)
        except ValueError as err:
            raise ValueError(f"{self!r} cannot load the checkpoint: {err}") from err


class GrokfastCallback(_TransformCallback):
    r"""Amplify the slow component of every gradient (Grokfast, Lee et al. 2024, arXiv 2405.20233).

    The filter runs in ``on_before_optimizer_step``: once per optimizer step, on the gradients the optimizer is
    about to use, that is after AMP unscaling, after the DDP all-reduce and after gradient accumulation, and
    before gradient clipping and ``optimizer.step()``. Only the parameters of that optimizer that have a gradient
    are filtered; the others keep their state. With an :class:`OrthoGradCallback` in the same Trainer the filter
    runs first, on the raw gradients, and ⊥Grad on its result, whatever the order in which they are listed.

    The filter state is saved in checkpoints and restored by ``trainer.fit(ckpt_path=...)``. Saved state fits when
    the filter (and for ``"ma"`` the window) is the same; a changed ``alpha`` or ``lamb`` continues from it with
    a warning.

    **One per Trainer.** A second GrokfastCallback would filter gradients that the first already filtered (the
    first step would be 9x the raw gradient instead of 3x) and build its state from them. Two of the same filter
    are refused by Lightning when the Trainer is built ("more than one stateful callback"); any other pair in
    ``setup``. From the LightningCLI, ``--trainer.callbacks+=...`` adds one to those a YAML already lists: set the
    arguments in the YAML instead.

    On the steps that reach the logger (``log_every_n_steps``) it logs ``grokfast/amplification``
    (``|filtered grad| / |raw grad|``: 1 means no change, below 1 when the slow component points against the
    gradient), ``grokfast/slow_ratio`` (``|lamb * slow| / |raw grad|``), ``grokfast/cosine`` (between the raw
    gradient and the slow component) and ``grokfast/skipped_steps`` (steps skipped because a gradient held inf or
    NaN). Undefined values are logged as NaN. With several optimizers the keys end in ``_opt{index}``.

    Args:
        filter: ``"ema"`` (Algorithm 2, the default) or ``"ma"`` (Algorithm 1).
        alpha: EMA momentum, in [0, 1); the paper recommends 0.8 to 0.99. Used by ``"ema"``.
        lamb: amplification factor, finite and >= 0; the paper recommends 0.1 to 5. ``None`` takes the paper's
            default of the filter: 2.0 for ``"ema"``, 5.0 for ``"ma"``.
        window_size: number of past gradients in the moving window, an integer >= 1. Used by ``"ma"``. Memory:
            ``window_size + 1`` copies of the parameters (100 x 4 bytes x 50M parameters is about 19 GiB); a
            state that cannot fit in the free memory of the training device is refused in ``setup``.
        warmup: leave gradients untouched until the window is full. Used by ``"ma"``.
        reduction: ``"mean"`` or ``"sum"`` of the window. Used by ``"ma"``.
        fp32_state: keep the state of 16-bit gradients (``bf16-true``, ``16-true``, ``.half()`` models) in float32,
            with float32 arithmetic. ``False`` keeps it in the gradient's dtype: half the memory, but a bfloat16
            EMA stops moving once ``(1 - alpha) * |g - mu|`` falls below bfloat16's resolution.
        log_diagnostics: log amplification, slow_ratio and cosine on logging steps (they cost a few extra reads of
            the gradients on those steps only). ``grokfast/skipped_steps`` is logged either way.
        skip_nonfinite: when a gradient holds inf or NaN, leave the filter state and the gradients of that step
            untouched, warn the first time and count it.
        foreach: use the multi-tensor ``torch._foreach_*`` kernels (``None``, the default, or ``True``) or a
            per-tensor loop (``False``).

    Example::

        from lightning import Trainer
        from lightning_grokfast import GrokfastCallback

        trainer = Trainer(callbacks=[GrokfastCallback(alpha=0.98, lamb=2.0)])
        trainer = Trainer(callbacks=[GrokfastCallback(filter="ma", window_size=100, lamb=5.0)])

    Raises:
        ValueError: for an argument out of its range, naming the argument and what is accepted.
    """

    _chain_order = 0
    _prefix = "grokfast"

    def __init__(
        self,
        filter: Literal["ema", "ma"] = "ema",
        alpha: float = 0.98,
        lamb: Optional[float] = None,
        window_size: int = 100,
        warmup: bool = True,
        reduction: Literal["mean", "sum"] = "mean",
        fp32_state: bool = True,
        log_diagnostics: bool = True,
        skip_nonfinite: bool = True,
        foreach: Optional[bool] = None,
    ) -> None:
        self.filter = check_choice("filter", filter, ("ema", "ma"))
        self.alpha = check_alpha(alpha)
        self.lamb = check_lamb(_DEFAULT_LAMB[self.filter] if lamb is None else lamb)
        self.window_size = check_window_size(window_size)
        self.warmup = check_bool("warmup", warmup)
        self.reduction: Literal["mean", "sum"] = check_choice("reduction", reduction, ("mean", "sum"))  # type: ignore[assignment]
        self.fp32_state = check_bool("fp32_state", fp32_state)
        super().__init__(log_diagnostics, skip_nonfinite, foreach)

    @override
    def config(self) -> dict[str, Any]:
        if self.filter == "ema":
            return {"filter": "ema", "alpha": self.alpha, "lamb": self.lamb}
        return {
            "filter": "ma",
            "window_size": self.window_size,
            "lamb": self.lamb,
            "warmup": self.warmup,
            "reduction": self.reduction,
        }

    @property
    @override
    def state_key(self) -> str:
        # only what decides whether saved state fits: the filter, and the window of the moving average
        fits = {"filter": self.filter, **({"window_size": self.window_size} if self.filter == "ma" else {})}
        return self._generate_state_key(**fits)

    @property
    def grad_filter(self) -> Optional[GradientTransform]:
        """The filter (``None`` until the first fit sets it up)."""
        return self._transform

    @override
    def _make(self, pl_module: pl.LightningModule) -> GradientTransform:
        opts: dict[str, Any] = {
            "fp32_state": self.fp32_state,
            "skip_nonfinite": self.skip_nonfinite,
            "foreach": self.foreach,
        }
        params = pl_module.named_parameters()
        if self.filter == "ema":
            return EMAFilter(params, alpha=self.alpha, lamb=self.lamb, **opts)
        return MAFilter(params, self.window_size, self.lamb, self.warmup, self.reduction, **opts)

    @override
    def _diagnostics(self, stats: FilterStats) -> dict[str, Optional[float]]:
        return {"amplification": stats.amplification, "slow_ratio": stats.slow_ratio, "cosine": stats.cosine}

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # validate/test/predict from a checkpoint: the filter plays no part
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # Lightning calls load_state_dict next
        others = [v for k, v in states.items() if str(k).startswith("GrokfastCallback") and isinstance(v, dict)]
        fitting = [v for v in others if self._fits(v.get("config", {}))]
        if len(fitting) == 1:  # written by 0.1.0, whose key held every setting: Lightning does not find it
            self.load_state_dict(fitting[0])
            return
        if others:
            held = "; ".join(_fmt("GrokfastCallback", v.get("config", {})) for v in others)
            raise ValueError(
                f"{self!r}: the checkpoint's Grokfast state does not fit this callback. It holds: {held}. A "
                "filter of the other kind or another window cannot continue from it; resume with the saved settings."
            )
        rank_zero_warn(f"{self!r}: the checkpoint holds no Grokfast state; the filter starts fresh from this step.")

    def _fits(self, saved: dict[str, Any]) -> bool:
        """Whether state saved under the settings ``saved`` can continue here: the same filter (and MA window)."""
        same = saved.get("filter") == self.filter
        return same and (self.filter == "ema" or saved.get("window_size") == self.window_size)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "filter" not in state_dict:
            raise ValueError("Not a GrokfastCallback state: no 'filter' entry.")
        saved = state_dict.get("config", {})
        changed = {k: (saved[k], v) for k, v in self.config().items() if k in saved and saved[k] != v}
        if changed:
            rank_zero_warn(
                f"{self!r}: resuming filter state saved with "
                + ", ".join(f"{k}={old!r}" for k, (old, _) in changed.items())
                + "; it continues under the new settings."
            )
        self._load(state_dict["filter"])

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._transform is None:
            return {} if self._pending is None else {"config": self.config(), "filter": self._pending}
        return {"config": self.config(), "filter": self._transform.state_dict()}


class OrthoGradCallback(_TransformCallback):
    r"""⊥Grad (Prieto et al. 2025, arXiv 2501.04697): remove from every gradient its component along its own weight.

    Per parameter tensor ``w`` with gradient ``g``: ``g_perp = g - (<w, g> / <w, w>) w``, rescaled to ``|g|``. It
    runs where :class:`GrokfastCallback` does (once per optimizer step, on the unscaled, all-reduced, accumulated
    gradients, before clipping) and behaves the same under DDP, accumulation, non-finite gradients and manual
    optimization. With a GrokfastCallback in the same Trainer it runs after the filter, on the filtered gradients,
    whatever the order in which they are listed. Stateless: nothing is checkpointed.

    On logging steps it logs ``orthograd/radial_fraction`` (``|radial part| / |g|`` over all transformed
    gradients) and ``orthograd/skipped_steps``.

    Args:
        apply_to: ``"all"`` parameters, or only ``"matrices"`` (tensors of two or more dimensions: weights and
            embeddings, not biases, LayerNorm gains or scalars).
        log_diagnostics: log ``orthograd/radial_fraction`` on logging steps.
        skip_nonfinite: when a gradient holds inf or NaN, leave the gradients of that step untouched, warn the first
            time and count it.
        foreach: use the multi-tensor ``torch._foreach_*`` kernels (``None``, the default, or ``True``) or a
            per-tensor loop (``False``).

    Example::

        from lightning import Trainer
        from lightning_grokfast import OrthoGradCallback

        trainer = Trainer(callbacks=[OrthoGradCallback()])
    """

    _chain_order = 1
    _prefix = "orthograd"

    def __init__(
        self,
        apply_to: Literal["all", "matrices"] = "all",
        log_diagnostics: bool = True,
        skip_nonfinite: bool = True,
        foreach: Optional[bool] = None,
    ) -> None:
        self.apply_to: Literal["all", "matrices"] = check_choice("apply_to", apply_to, APPLY_TO)  # type: ignore[assignment]
        super().__init__(log_diagnostics, skip_nonfinite, foreach)

    @override
    def config(self) -> dict[str, Any]:
        return {"apply_to": self.apply_to}

    @override
    def _make(self, pl_module: pl.LightningModule) -> GradientTransform:
        return OrthoGrad(
            pl_module.named_parameters(),
            self.apply_to,
            skip_nonfinite=self.skip_nonfinite,
            foreach=self.foreach,
        )

    @override
    def _diagnostics(self, stats: OrthoGradStats) -> dict[str, Optional[float]]:
        return {"radial_fraction": stats.radial_fraction}
