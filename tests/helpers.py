"""The one test scaffold: naive filter references, a gradient recorder, a tiny model, a Trainer factory, equality.

Nothing here imports ``lightning_grokfast``: the references restate arXiv 2405.20233 one parameter at a time in
float64, so the package is checked against something written independently of it.
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

Grads = dict[str, Tensor | None]
"""One optimizer step's gradients: parameter name -> gradient (``None`` where it has none)."""

# --------------------------------------------------------------------------------------------- references


class NaiveEMA:
    """The EMA filter (the paper's Algorithm 2): per parameter, at its first gradient ``mu = g``; then every step
    ``mu = alpha * mu + (1 - alpha) * g`` and ``g_hat = g + lamb * mu``. The state comes from raw gradients only.

    ``feedback=True`` builds a deliberately wrong variant that feeds ``g_hat`` back into ``mu``: the tests use it
    to show that they can tell the two apart.
    """

    def __init__(self, alpha: float, lamb: float, feedback: bool = False) -> None:
        self.alpha, self.lamb, self.feedback = alpha, lamb, feedback
        self.mu: dict[str, Tensor] = {}

    def step(self, grads: Mapping[str, Tensor | None]) -> Grads:
        out: Grads = {}
        for name, grad in grads.items():
            if grad is None:
                out[name] = None
                continue
            g = grad.detach().double().clone()
            prev = self.mu.get(name, g)
            out[name] = g + self.lamb * (self.alpha * prev + (1 - self.alpha) * g)
            fed = out[name] if self.feedback else g  # what the state is built from
            self.mu[name] = self.alpha * self.mu.get(name, fed) + (1 - self.alpha) * fed
        return out


class NaiveMA:
    """The MA filter (the paper's Algorithm 1): per parameter the last ``window_size`` raw gradients, the current
    one included. With ``warmup`` ``g`` is left untouched until the window is full; then
    ``g_hat = g + lamb * mean(window)`` (``reduction="sum"``: the sum). Without warm-up the mean is over what has
    been seen so far. ``feedback=True``: the wrong variant whose window stores ``g_hat`` instead of ``g``.
    """

    def __init__(
        self, window_size: int, lamb: float, warmup: bool = True, reduction: str = "mean", feedback: bool = False
    ) -> None:
        self.size, self.lamb, self.warmup, self.reduction = window_size, lamb, warmup, reduction
        self.feedback = feedback
        self.window: dict[str, list[Tensor]] = {}

    def step(self, grads: Mapping[str, Tensor | None]) -> Grads:
        out: Grads = {}
        for name, grad in grads.items():
            if grad is None:
                out[name] = None
                continue
            g = grad.detach().double().clone()
            window = self.window.setdefault(name, [])
            window.append(g.clone())
            del window[: -self.size]
            if self.warmup and len(window) < self.size:
                out[name] = g
                continue
            total = sum(window, torch.zeros_like(g))
            out[name] = g + self.lamb * (total / len(window) if self.reduction == "mean" else total)
            if self.feedback:
                window[-1] = out[name].clone()
        return out


def naive_orthograd(w: Tensor, g: Tensor) -> Tensor:
    """⊥Grad of one tensor from the definition (arXiv 2501.04697), in float64: ``g_perp = g - (<w, g> / <w, w>) w``
    rescaled to ``|g|``; a zero weight leaves ``g`` as it is; a gradient radial to float32 rounding (so any gradient of
    a one-element tensor) becomes 0."""
    w64, g64 = w.detach().double().reshape(-1), g.detach().double().reshape(-1)
    if not bool(w64.any()):
        return g64.reshape(g.shape).clone()
    perp = g64 - (w64 @ g64) / (w64 @ w64) * w64
    if perp.norm() <= 1e-6 * g64.norm():
        return torch.zeros(g.shape, dtype=torch.float64)
    return (perp * g64.norm() / perp.norm()).reshape(g.shape)


def reference(kind: str, feedback: bool = False, **kwargs: Any) -> NaiveEMA | NaiveMA:
    """A fresh reference for ``kind`` ("ema" or "ma") from filter or callback keyword arguments (others ignored)."""
    if kind == "ema":
        return NaiveEMA(kwargs["alpha"], kwargs["lamb"], feedback)
    names = ("window_size", "lamb", "warmup", "reduction")
    return NaiveMA(**{k: v for k, v in kwargs.items() if k in names}, feedback=feedback)


def replay(ref: NaiveEMA | NaiveMA, raw: Iterable[Mapping[str, Tensor | None]]) -> list[Grads]:
    """Feed a recorded raw-gradient sequence through a reference, one step at a time."""
    return [ref.step(step) for step in raw]


def magnitudes(kind: str, raw: Iterable[Mapping[str, Tensor | None]], **kwargs: Any) -> list[Grads]:
    """The filter's operand sizes ``|g| + lamb * slow(|g|)``: a fresh reference run on ``|g|``.

    Float rounding errors are a small multiple of eps times this, whereas ``g + lamb * slow`` itself can cancel.
    """
    return replay(reference(kind, **kwargs), [{n: None if g is None else g.abs() for n, g in s.items()} for s in raw])


# --------------------------------------------------------------------------------------------- equality


def assert_state_equal(
    actual: Any, expected: Any, rtol: float = 0.0, atol: float = 0.0, path: str = "", **kwargs: Any
) -> None:
    """``torch.testing.assert_close`` over nested dicts / lists / tensors / numbers, exact (and of the same dtype)
    by default; strings and ``None`` compared with ``==``; ``kwargs`` go to ``assert_close`` (``check_dtype=False``
    compares in the common dtype, ``equal_nan=True`` takes NaN for equal to NaN)."""
    if isinstance(actual, Mapping) and isinstance(expected, Mapping):
        assert actual.keys() == expected.keys(), f"{path}: keys differ: {sorted(actual)} vs {sorted(expected)}"
        for key in expected:
            assert_state_equal(actual[key], expected[key], rtol, atol, f"{path}[{key!r}]", **kwargs)
    elif isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: lengths differ: {len(actual)} vs {len(expected)}"
        for i, (a, b) in enumerate(zip(actual, expected)):
            assert_state_equal(a, b, rtol, atol, f"{path}[{i}]", **kwargs)
    elif isinstance(actual, (str, bytes, type(None))) or isinstance(expected, (str, bytes, type(None))):
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"
    else:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{path}: {m}", **kwargs)


def assert_grads_close(actual: list[Grads], raw: list[Grads], kind: str, rtol: float = 1e-6, **kwargs: Any) -> None:
    """``actual`` is the reference ``kind(**kwargs)`` replayed on ``raw``: same steps, names, ``None`` pattern,
    shapes and dtypes (the raw one), and per tensor ``max|a - b| <= rtol * max(|g| + lamb * slow(|g|))``."""
    expected, scale = replay(reference(kind, **kwargs), raw), magnitudes(kind, raw, **kwargs)
    assert len(actual) == len(expected), f"{len(actual)} steps vs {len(expected)}"
    for step, (act, exp, mag, g) in enumerate(zip(actual, expected, scale, raw)):
        assert act.keys() == exp.keys(), f"step {step}: names differ"
        for name, b in exp.items():
            a = act[name]
            assert (a is None) == (b is None), f"step {step} {name}: gradient presence differs"
            if a is not None and b is not None:
                assert a.shape == b.shape and a.dtype == g[name].dtype, f"step {step} {name}: {a.shape}, {a.dtype}"
                tol = rtol * max(mag[name].abs().max().item(), 1e-30) if b.numel() else 0.0
                assert_state_equal(a, b, 0.0, tol, f"step {step} {name}", check_dtype=False)


def max_rel_diff(a: list[Grads], b: list[Grads]) -> float:
    """Largest ``max|x - y| / max|y|`` over the steps and tensors both sequences hold."""
    pairs = [(s[n], t[n]) for s, t in zip(a, b) for n in t if s[n] is not None and t[n] is not None]
    return max((x.double() - y.double()).abs().max().item() / max(y.abs().max().item(), 1e-30) for x, y in pairs)


def state_tensors(obj: Any, seen: set[int] | None = None) -> list[Tensor]:
    """Every tensor (``nn.Parameter``s aside) reachable from ``obj`` through dicts, lists, tuples and the attributes
    of ``lightning_grokfast`` objects: the state of a transform or a callback, whatever its layout."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, nn.Parameter):
        return []
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in state_tensors(v, seen)]
    if isinstance(obj, (list, tuple, set)):
        return [t for v in obj for t in state_tensors(v, seen)]
    if type(obj).__module__.startswith("lightning_grokfast"):
        return [t for v in vars(obj).values() for t in state_tensors(v, seen)]
    return []


def assert_no_alias(owner: Any, params: Iterable[Tensor]) -> None:
    """No tensor held by ``owner`` (a transform or a callback) shares storage with a parameter's ``.grad``."""
    grads = {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None} - {0}
    held = state_tensors(owner)
    assert held, "found no state tensors to check"
    assert not [t.shape for t in held if t.untyped_storage().data_ptr() in grads], "state shares storage with .grad"


# --------------------------------------------------------------------------------------------- Lightning side


def present(grads: Mapping[str, Tensor | None], names: Any = None) -> dict[str, Tensor]:
    """The gradients that are there (of ``names`` only, if given)."""
    return {n: g for n, g in grads.items() if g is not None and (names is None or n in names)}


def norm(grads: Mapping[str, Tensor]) -> float:
    """The global L2 norm of a set of tensors, in float64."""
    return float(sum(g.double().square().sum() for g in grads.values())) ** 0.5


def mus(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """The EMA state tensors of an ``EMAFilter.state_dict()``, by parameter name."""
    return {name: entry["mu"] for name, entry in state["state"].items()}


def read_metrics(logger: Any) -> list[dict[str, str]]:
    """The rows of a ``CSVLogger``'s ``metrics.csv``."""
    with (Path(logger.log_dir) / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """The logged values of ``key``, by step."""
    return {int(row["step"]): float(row[key]) for row in rows if row.get(key)}


def snapshot(named_params: Iterable[tuple[str, Tensor]]) -> Grads:
    """Clone every parameter's ``.grad`` (``None`` stays ``None``)."""
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in named_params}


class GradRecorder(L.Callback):
    """At every call of ``hook`` (default ``on_before_optimizer_step``), clone every parameter's ``.grad`` into
    :attr:`steps`, with the parameter values, global step, epoch, optimizer, GradScaler scale and, given
    ``of`` (a transform callback), a deep copy of its transform's state dict, in parallel lists.

    Callbacks run in list order: placed before a transform callback it sees the raw gradients and the state before
    the step, after it the transformed ones and the state after. ``on_train_batch_end`` sees what the optimizer
    used (after clipping). ``check_alias`` asserts at every call that ``of`` shares no storage with a ``.grad``.
    """

    def __init__(self, of: Any = None, hook: str = "on_before_optimizer_step", check_alias: bool = False) -> None:
        self.of, self.check_alias = of, check_alias
        self.steps: list[Grads] = []
        self.params: list[dict[str, Tensor]] = []
        self.states: list[Any] = []
        self.global_steps: list[int] = []
        self.epochs: list[int] = []
        self.optimizers: list[int | None] = []
        self.scales: list[float | None] = []
        setattr(self, hook, self._record)

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.steps.append(snapshot(pl_module.named_parameters()))
        self.params.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})
        transform = None if self.of is None else self.of.transform
        self.states.append(None if transform is None else copy.deepcopy(transform.state_dict()))
        self.global_steps.append(trainer.global_step)
        self.epochs.append(trainer.current_epoch)
        opt = args[0] if args and isinstance(args[0], torch.optim.Optimizer) else None
        self.optimizers.append(next((i for i, o in enumerate(trainer.optimizers) if o is opt), None))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(None if scaler is None else float(scaler.get_scale()))
        if self.check_alias:
            assert_no_alias(self.of, pl_module.parameters())


def regression_data(samples: int = 64, features: int = 4, outputs: int = 1, seed: int = 0) -> TensorDataset:
    """A deterministic regression data set."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=gen)
    w = torch.linspace(-2.0, 1.5, features * outputs).reshape(features, outputs)
    return TensorDataset(x, torch.sin(x @ w) + 0.1 * x[:, :1] ** 2)


class TinyModel(BoringModel):
    """Lightning's ``BoringModel`` as a tiny MLP on deterministic regression data (unshuffled), SGD with momentum.

    Parameters: ``net.0`` (hidden x features, hidden), ``net.2`` (outputs x hidden, outputs), ``scale`` (0-d),
    ``late`` (hidden,), used only from batch index ``late_from`` on (``None``: always), and ``frozen`` (hidden,)
    with ``requires_grad=False``. ``set_to_none`` goes to ``zero_grad``; :attr:`zeroed_to_none` records, after
    each ``zero_grad``, whether every gradient was ``None``.
    """

    def __init__(
        self,
        hidden: int = 6,
        features: int = 4,
        outputs: int = 1,
        late_from: int | None = None,
        set_to_none: bool = True,
        lr: float = 0.01,
        batch_size: int = 8,
        samples: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        del self.layer
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, outputs))
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.late = nn.Parameter(0.1 * torch.randn(hidden))
        self.frozen = nn.Parameter(0.1 * torch.randn(hidden), requires_grad=False)
        self.late_from, self.set_to_none, self.lr, self.batch_size = late_from, set_to_none, lr, batch_size
        self.data = regression_data(samples, features, outputs, seed)
        self.zeroed_to_none: list[bool] = []

    def forward(self, x: Tensor, use_late: bool = True) -> Tensor:
        h = self.net[1](self.net[0](x) + self.frozen)
        return self.scale * self.net[2](h * (1.0 + self.late) if use_late else h)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x, self.late_from is None or batch_idx >= self.late_from), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.training_step(batch, batch_idx))

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=self.set_to_none)
        self.zeroed_to_none.append(all(p.grad is None for p in self.parameters()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False)

    val_dataloader = train_dataloader


class SGDModel(TinyModel):
    """The tiny model with plain SGD (no momentum), so that ``w_new = w_old - lr * g``."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def make_trainer(
    root: Any = None, callbacks: Iterable[L.Callback] = (), max_steps: int = 8, **kwargs: Any
) -> L.Trainer:
    """A quiet single-process CPU Trainer: no logger, checkpointing, progress bar, summary or validation."""
    options: dict[str, Any] = dict(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    return L.Trainer(callbacks=list(callbacks), **{**options, **kwargs})


class Run(NamedTuple):
    """What :func:`fit` returns."""

    raw: GradRecorder
    filtered: GradRecorder
    trainer: L.Trainer
    model: L.LightningModule


def fit(
    transform: L.Callback | None = None,
    model: L.LightningModule | None = None,
    max_steps: int = 8,
    check_alias: bool = False,
    **kwargs: Any,
) -> Run:
    """Seed, then fit ``model`` (default ``TinyModel()``) with ``[raw recorder, transform, filtered recorder]``
    (extra ``callbacks`` after them); ``kwargs`` go to :func:`make_trainer`."""
    L.seed_everything(0, verbose=False)
    model = TinyModel() if model is None else model
    raw, filtered = GradRecorder(transform), GradRecorder(transform, check_alias=check_alias)
    chain = [raw, *([transform] if transform is not None else []), filtered, *kwargs.pop("callbacks", [])]
    ckpt_path = kwargs.pop("ckpt_path", None)
    make_trainer(callbacks=chain, max_steps=max_steps, **kwargs).fit(model, ckpt_path=ckpt_path)
    return Run(raw, filtered, model.trainer, model)
