"""GrokfastCallback: the Lightning glue around :mod:`lightning_grokfast.filters`."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer

from lightning_grokfast._validation import check_alpha, check_bool, check_choice, check_lamb, check_window_size
from lightning_grokfast.filters import EMAFilter, FilterStats, GradientFilter, MAFilter

_DEFAULT_LAMB = {"ema": 2.0, "ma": 5.0}
_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy")


class GrokfastCallback(Callback):
    r"""Amplify the slow component of every gradient (Grokfast, Lee et al. 2024, arXiv 2405.20233).

    The filter runs in ``on_before_optimizer_step``: once per optimizer step, on the gradients the
    optimizer is about to use, that is after AMP unscaling, after the DDP all-reduce and after gradient
    accumulation, and before gradient clipping and ``optimizer.step()``. Only the parameters of that
    optimizer that have a gradient are filtered; the others keep their state.

    The filter state is saved in checkpoints and restored by ``trainer.fit(ckpt_path=...)``.

    On the steps that reach the logger (``log_every_n_steps``) it logs ``grokfast/amplification``
    (``||filtered grad|| / ||raw grad||``), ``grokfast/slow_ratio`` (``||lamb * slow|| / ||raw grad||``),
    ``grokfast/cosine`` (between the raw gradient and the slow component) and ``grokfast/skipped_steps``
    (steps skipped because a gradient held inf or NaN). On a skipped step, and where a value is undefined
    (cosine with a zero slow component), the diagnostics are logged as NaN. With several optimizers the keys
    end in ``_opt{index}``.

    Args:
        filter: ``"ema"`` (Algorithm 2, the default) or ``"ma"`` (Algorithm 1).
        alpha: EMA momentum, in [0, 1); the paper recommends 0.8 to 0.99. Used by ``"ema"``.
        lamb: amplification factor, finite and >= 0; the paper recommends 0.1 to 5. ``None`` takes the
            paper's default of the filter: 2.0 for ``"ema"``, 5.0 for ``"ma"``.
        window_size: number of past gradients in the moving window, an integer >= 1. Used by ``"ma"``.
        warmup: leave gradients untouched until the window is full. Used by ``"ma"``.
        reduction: ``"mean"`` or ``"sum"`` of the window. Used by ``"ma"``.
        log_diagnostics: log amplification, slow_ratio and cosine on logging steps (they cost a few extra
            reads of the gradients on those steps only). ``grokfast/skipped_steps`` is logged either way.
        skip_nonfinite: when a gradient holds inf or NaN, leave the filter state and the gradients of that
            step untouched, warn the first time and count it.
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

    def __init__(
        self,
        filter: Literal["ema", "ma"] = "ema",
        alpha: float = 0.98,
        lamb: Optional[float] = None,
        window_size: int = 100,
        warmup: bool = True,
        reduction: Literal["mean", "sum"] = "mean",
        log_diagnostics: bool = True,
        skip_nonfinite: bool = True,
        foreach: Optional[bool] = None,
    ) -> None:
        self.filter = check_choice("filter", filter, ("ema", "ma"))
        self.alpha = check_alpha(alpha)
        self.lamb = check_lamb(_DEFAULT_LAMB[self.filter] if lamb is None else lamb)
        self.window_size = check_window_size(window_size)
        self.warmup = bool(check_bool("warmup", warmup))
        self.reduction = check_choice("reduction", reduction, ("mean", "sum"))
        self.log_diagnostics = bool(check_bool("log_diagnostics", log_diagnostics))
        self.skip_nonfinite = bool(check_bool("skip_nonfinite", skip_nonfinite))
        self.foreach = check_bool("foreach", foreach, optional=True)
        self._filter: GradientFilter | None = None
        self._module: pl.LightningModule | None = None
        self._pending_state: dict[str, Any] | None = None
        self._foreign: set[int] = set()  # ids of optimizer tensors that are not parameters of the module

    # ------------------------------------------------------------------ configuration
    def _config(self) -> dict[str, Any]:
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
    def state_key(self) -> str:
        return self._generate_state_key(**self._config())

    @property
    def grad_filter(self) -> GradientFilter | None:
        """The filter (``None`` until the first fit sets it up)."""
        return self._filter

    def _build(self, pl_module: pl.LightningModule) -> GradientFilter:
        """Create the filter over ``pl_module``'s parameters, or re-register them, keeping the state."""
        params = list(pl_module.named_parameters())
        if self._filter is not None and self._module is pl_module:
            self._filter.set_parameters(params)
            return self._filter
        opts = {"skip_nonfinite": self.skip_nonfinite, "foreach": self.foreach}
        if self.filter == "ema":
            self._filter = EMAFilter(params, alpha=self.alpha, lamb=self.lamb, **opts)
        else:
            ma = {"window_size": self.window_size, "warmup": self.warmup, "reduction": self.reduction}
            self._filter = MAFilter(params, lamb=self.lamb, **ma, **opts)
        self._module = pl_module
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._filter.load_state_dict(state["filter"])
        return self._filter

    # ------------------------------------------------------------------ hooks, in call order
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy)
        names = {cls.__name__ for cls in strategy.__mro__}
        refused = names.intersection(_UNSUPPORTED_STRATEGIES)
        if refused:
            raise ValueError(
                f"GrokfastCallback does not support {strategy.__name__}: its gradients are sharded or not "
                "materialised where Lightning calls `on_before_optimizer_step`, so the filter would be wrong or a "
                "silent no-op. Supported: single device (CPU, CUDA, MPS) and the DDP family "
                "('ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook', any number of nodes)."
            )
        if self._module is not None and self._module is not pl_module:
            self._filter = None  # another model: start afresh

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # validate/test/predict from a checkpoint: the filter plays no part
        self._build(pl_module)
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # Lightning calls load_state_dict next
        others = {k: v for k, v in states.items() if isinstance(k, str) and k.startswith("GrokfastCallback")}
        ours = [k for k, v in others.items() if _compatible(v, self._config())]
        if not others:
            rank_zero_warn(
                "GrokfastCallback: the checkpoint holds no Grokfast state; the filter starts fresh from this step."
            )
            return
        if len(ours) != 1:
            raise ValueError(
                f"GrokfastCallback({_fmt(self._config())}): the checkpoint's Grokfast state does not fit this "
                f"callback. It holds: {'; '.join(_fmt(v.get('config', {})) for v in others.values())}. A filter "
                "of the other kind or another window cannot continue from it; resume with the saved settings."
            )
        saved = others[ours[0]]
        rank_zero_warn(
            f"GrokfastCallback: resuming filter state saved with {_fmt(saved['config'])} under the new settings "
            f"{_fmt(self._config())}."
        )
        self._load(saved, pl_module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load(state_dict, self._module)

    def _load(self, state: dict[str, Any], pl_module: pl.LightningModule | None) -> None:
        if "filter" not in state:
            raise ValueError("Not a GrokfastCallback state: no 'filter' entry.")
        if pl_module is None:
            self._pending_state = state  # loaded before any fit: applied when the filter is built
            return
        grad_filter = self._build(pl_module)
        try:
            grad_filter.load_state_dict(state["filter"])
        except ValueError as err:
            raise ValueError(f"GrokfastCallback({_fmt(self._config())}) cannot load the checkpoint: {err}") from err

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build(pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        grad_filter = self._filter if self._filter is not None else self._build(pl_module)
        params = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in self._foreign]
        if not all(grad_filter.is_registered(p) for p in params):
            grad_filter = self._build(pl_module)  # parameters replaced since the fit started?
            params = self._registered(grad_filter, params)
        logging = bool(trainer.loggers) and trainer._logger_connector.should_update_logs
        stats = grad_filter.step(params, compute_stats=logging and self.log_diagnostics)
        if logging:
            self._log(trainer, pl_module, optimizer, stats, grad_filter.skipped_steps)

    def _registered(self, grad_filter: GradientFilter, params: list[Any]) -> list[Any]:
        known = [p for p in params if grad_filter.is_registered(p)]
        if len(known) < len(params):
            self._foreign.update(id(p) for p in params if not grad_filter.is_registered(p))
            rank_zero_warn(
                f"GrokfastCallback: {len(params) - len(known)} tensor(s) in the optimizer are not parameters of the "
                "LightningModule; they are stepped unfiltered."
            )
        return known

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: Optimizer,
        stats: FilterStats,
        skipped: int,
    ) -> None:
        suffix = ""
        if len(trainer.optimizers) > 1:
            index = next(i for i, opt in enumerate(trainer.optimizers) if opt is optimizer)
            suffix = f"_opt{index}"
        values: dict[str, float] = {"grokfast/skipped_steps": float(skipped)}
        if self.log_diagnostics:  # NaN where undefined (a skipped step): loggers repeat a key that is not logged
            for key in ("amplification", "slow_ratio", "cosine"):
                value = getattr(stats, key)
                values[f"grokfast/{key}"] = math.nan if value is None else value
        pl_module.log_dict({k + suffix: v for k, v in values.items()}, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self._filter is None:
            return {} if self._pending_state is None else dict(self._pending_state)
        return {"config": self._config(), "filter": self._filter.state_dict()}


def _compatible(saved: Any, config: dict[str, Any]) -> bool:
    """Whether state saved under ``saved['config']`` can continue under ``config`` (same filter and window)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        return False
    old = saved["config"]
    same_kind = old.get("filter") == config["filter"]
    return same_kind and (config["filter"] == "ema" or old.get("window_size") == config["window_size"])


def _fmt(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items())
