"""The Lightning callbacks: thin glue around the plain-PyTorch transforms.

Each callback takes the typed arguments LightningCLI shows and turns them into the transform's settings object
(checked there, once). Its hooks, in the order Lightning calls them: ``setup`` (strategy and stacking checks),
``on_fit_start`` (the transform built over the final parameters, its memory checked), ``load_state_dict`` /
``on_load_checkpoint`` (resume; before or after ``on_fit_start``, by strategy), ``on_before_optimizer_step`` (the
step), ``on_train_batch_end`` (what the optimizer stepped on counts as transformed) and ``state_dict``.
"""

from __future__ import annotations

import math
import sys
from typing import Any, ClassVar, Literal, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_grokfast.filters import EMAFilter, FilterStats, MAFilter
from lightning_grokfast.orthograd import OrthoGrad, OrthoGradStats
from lightning_grokfast.settings import EMASettings, MASettings, OrthoGradSettings, Settings, _flag, choice
from lightning_grokfast.transform import GradientTransform, format_bytes

_TRANSFORMS: dict[type[Settings], type[GradientTransform[Any]]] = {
    EMASettings: EMAFilter,
    MASettings: MAFilter,
    OrthoGradSettings: OrthoGrad,
}
# Strategies whose gradients are flat shards or not materialised where Lightning calls `on_before_optimizer_step`.
_UNSUPPORTED = ("FSDPStrategy", "DeepSpeedStrategy", "XLAStrategy")


def _unsupported(strategy: Any) -> bool:
    """Whether ``strategy`` is (a subclass of) one of :data:`_UNSUPPORTED`, under the package name ``lightning`` or
    ``pytorch_lightning`` (2.x installs both, with classes of their own)."""
    packages = [sys.modules.get(name) for name in ("lightning.pytorch.strategies", "pytorch_lightning.strategies")]
    classes = tuple(getattr(p, n) for p in packages if p is not None for n in _UNSUPPORTED if hasattr(p, n))
    return isinstance(strategy, classes)


def _logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether this step's metrics reach the loggers (every ``log_every_n_steps``), so that costly diagnostics are
    computed only then. Lightning keeps that decision in a private attribute and offers no public one."""
    return bool(trainer.loggers) and bool(trainer._logger_connector.should_update_logs)


def _transform_callbacks(trainer: pl.Trainer) -> list[_TransformCallback]:
    """The Trainer's transform callbacks, in the order it calls them."""
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's connector
    return [cb for cb in callbacks if isinstance(cb, _TransformCallback)]


class _TransformCallback(Callback):
    """What both callbacks share: strategy and stacking checks, the one order of the transforms, logging, state.

    Every transform callback of a Trainer runs from the hook of the first one listed, in the order of
    ``_chain_order`` (the Grokfast filter on the raw gradients, then ⊥Grad on its result), whatever the order
    in which they are listed.
    """

    _chain_order: ClassVar[int]
    _prefix: ClassVar[str]

    def __init__(self, settings: Settings, log_diagnostics: bool) -> None:
        self.settings = settings
        self.log_diagnostics = _flag("log_diagnostics", log_diagnostics)
        self._transform: Optional[GradientTransform[Any]] = None
        self._module: Optional[pl.LightningModule] = None
        self._pending: Optional[dict[str, Any]] = None  # state loaded before any fit built the transform
        self._chain: list[_TransformCallback] = [self]
        self._foreign: set[int] = set()  # ids of optimizer tensors that are not parameters of the module
        self._stepped: list[Tensor] = []  # parameters transformed in this batch

    @property
    def transform(self) -> Optional[GradientTransform[Any]]:
        """The plain-PyTorch transform (``None`` until the first fit sets it up)."""
        return self._transform

    def config(self) -> dict[str, Any]:
        """The settings that shape the arithmetic, as messages show them."""
        return self.settings.describe()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in self.config().items()) + ")"

    def _diagnostics(self, stats: Any) -> dict[str, Optional[float]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks, in call order
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        name = type(self).__name__
        if _unsupported(trainer.strategy):
            raise ValueError(
                f"{name} does not support {type(trainer.strategy).__name__}: its gradients are flat shards or not "
                "materialised where Lightning calls `on_before_optimizer_step`, so the transform would be wrong or "
                "a silent no-op. Supported: single device (CPU, CUDA, MPS), the DDP family ('ddp', 'ddp_spawn', "
                "'ddp_fork', 'ddp_notebook', any number of nodes), and ModelParallelStrategy: to shard a model, call "
                "`torch.distributed.fsdp.fully_shard` (FSDP2) in `configure_model` and train with it."
            )
        transforms = _transform_callbacks(trainer)
        twins = [cb for cb in transforms if cb._chain_order == self._chain_order]
        if len(twins) > 1:
            listed = " and ".join(repr(cb) for cb in twins)
            raise ValueError(
                f"The Trainer holds {len(twins)} {name}s: {listed}. Stacked, each would transform the gradients "
                "the one before already transformed, and build its state from them. Keep one. From the "
                f"LightningCLI, `--trainer.callbacks+=lightning_grokfast.{name}` adds one to those a YAML config "
                "already lists: set its arguments in the YAML, or replace the whole list with "
                "`--trainer.callbacks=[...]`."
            )
        self._chain = sorted(transforms, key=lambda cb: cb._chain_order)
        if self._module is not pl_module:
            self._transform = None  # another model: start afresh

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Only now are the parameters final: `configure_model` may create or shard them after `setup`, and the
        # strategy has moved them to their device. Nothing is allocated before the first step.
        transform = self._build(pl_module)
        nbytes = transform.expected_state_bytes()
        if nbytes:
            rank_zero_info(f"{self!r}: its state will hold {format_bytes(nbytes)} ({transform._memory_rule()}).")
            transform.check_memory(trainer.strategy.root_device)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if next(iter(_transform_callbacks(trainer)), self) is not self:
            return  # the first transform callback listed runs every one, in their one order
        logging = _logs_this_step(trainer)
        for cb in self._chain:
            cb._step(trainer, pl_module, optimizer, logging)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if next(iter(_transform_callbacks(trainer)), self) is not self:
            return
        # After the optimizer step: the gradients it used (clipped, transformed by the whole chain) are what each
        # transform must leave alone until something writes them again.
        for cb in self._chain:
            if cb._stepped and cb._transform is not None:
                cb._transform.mark_transformed(p.grad for p in cb._stepped if p.grad is not None)
            cb._stepped = []

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
        self._stepped.extend(params)
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

    def _build(self, pl_module: pl.LightningModule) -> GradientTransform[Any]:
        """Create the transform over ``pl_module``'s parameters, or re-register them, keeping the state."""
        if self._transform is not None and self._module is pl_module:
            self._transform.set_parameters(pl_module.named_parameters())
            return self._transform
        cls = _TRANSFORMS[type(self.settings)]
        self._transform, self._module = cls.from_settings(pl_module.named_parameters(), self.settings), pl_module
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
            state that cannot fit in the free memory of the training device is refused when the fit starts.
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
        fused: ``True`` runs each group's update as one kernel that ``torch.compile`` builds at the first step (one
            pass over gradient and state; the first step compiles it: 2-17 s on CPU). ``None`` (the default) and
            ``False`` do not compile. ``True`` fails with a clear message where the kernels cannot be built.

    Every argument is checked in the constructor, those of the other filter too, so that a typo fails at once.

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
    settings: EMASettings | MASettings

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
        fused: Optional[bool] = None,
    ) -> None:
        kind = choice("filter", filter, ("ema", "ma"))
        common: dict[str, Any] = {"fp32_state": fp32_state, "skip_nonfinite": skip_nonfinite, "foreach": foreach}
        common["fused"] = fused
        if lamb is not None:  # else each filter's own default
            common["lamb"] = lamb
        ema = EMASettings(alpha, **common)
        ma = MASettings(window_size, warmup=warmup, reduction=reduction, **common)
        super().__init__(ema if kind == "ema" else ma, log_diagnostics)

    @override
    def config(self) -> dict[str, Any]:
        return {"filter": self.settings.kind, **self.settings.describe()}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(filter=self.settings.kind, **self.settings.must_match())

    @property
    def grad_filter(self) -> Optional[GradientTransform[Any]]:
        """The filter (``None`` until the first fit sets it up)."""
        return self._transform

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
        if states.get(self.state_key):
            return  # Lightning calls load_state_dict next
        if self.state_key in states:  # Lightning skips an empty entry: nothing would say the filter starts afresh
            rank_zero_warn(
                f"{self!r}: the checkpoint's entry {self.state_key!r} is empty; the filter starts fresh from this step."
            )
            return
        saved = [v["filter"] for k, v in states.items() if str(k).startswith("GrokfastCallback") and v.get("filter")]
        fitting = [s for s in saved if self.settings.mismatch(s.get("kind"), s.get("hparams", {})) is None]
        if len(fitting) == 1:  # written by 0.1.0, whose key held every setting: Lightning does not find it
            self._load(fitting[0])
            return
        if saved:
            held = "; ".join(f"{s.get('kind')!r} with {s.get('hparams')}" for s in saved)
            raise ValueError(
                f"{self!r}: the checkpoint's Grokfast state does not fit this callback. It holds: {held}. A "
                "filter of the other kind or another window cannot continue from it; resume with the saved settings."
            )
        rank_zero_warn(f"{self!r}: the checkpoint holds no Grokfast state; the filter starts fresh from this step.")

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "filter" not in state_dict:
            raise ValueError("Not a GrokfastCallback state: no 'filter' entry.")
        changed = self.settings.changed(state_dict["filter"].get("hparams", {}))
        if changed:
            rank_zero_warn(
                f"{self!r}: resuming filter state saved with "
                + ", ".join(f"{k}={old!r}" for k, old in changed.items())
                + "; it continues under the new settings."
            )
        self._load(state_dict["filter"])

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._transform is None:
            return {} if self._pending is None else {"filter": self._pending}
        return {"filter": self._transform.state_dict(full_state_dict=True)}  # sharded: gathered, every rank


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
        fused: ``True`` runs each group's update as one kernel that ``torch.compile`` builds at the first step (one
            pass over gradient and state; the first step compiles it: 2-17 s on CPU). ``None`` (the default) and
            ``False`` do not compile. ``True`` fails with a clear message where the kernels cannot be built.

    Example::

        from lightning import Trainer
        from lightning_grokfast import OrthoGradCallback

        trainer = Trainer(callbacks=[OrthoGradCallback()])
    """

    _chain_order = 1
    _prefix = "orthograd"
    settings: OrthoGradSettings

    def __init__(
        self,
        apply_to: Literal["all", "matrices"] = "all",
        log_diagnostics: bool = True,
        skip_nonfinite: bool = True,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
    ) -> None:
        options: dict[str, Any] = {"skip_nonfinite": skip_nonfinite, "foreach": foreach, "fused": fused}
        super().__init__(OrthoGradSettings(apply_to, **options), log_diagnostics)

    @override
    def _diagnostics(self, stats: OrthoGradStats) -> dict[str, Optional[float]]:
        return {"radial_fraction": stats.radial_fraction}
