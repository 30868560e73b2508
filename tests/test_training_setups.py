"""GrokfastCallback under real Lightning training setups, on CPU with tiny models and generated data.

Covered: gradient accumulation, non-finite gradients under 16-mixed (GradScaler), 32-true and bf16-mixed,
gradient clipping, manual optimization with two optimizers, layers unfrozen mid-training by
``BackboneFinetuning``, the strategies the callback refuses (FSDP, DeepSpeed, model parallel) or accepts
(a DDP subclass), and the logged diagnostics.

The gradients are recorded by small callbacks placed before the Grokfast callback (they see the raw
gradients) and after it (they see the filtered ones), and checked against a naive float64 restatement of
the EMA filter (the paper's Algorithm 2).
"""

from __future__ import annotations

import copy
import csv
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import BackboneFinetuning, Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, TensorDataset

from lightning_grokfast import FilterStats, GrokfastCallback

BAD_PARAM = "net.0.weight"
"""The parameter whose gradient the non-finite tests overwrite with inf or NaN."""


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is faster and leaves the other core to other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def clean_process_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Restore the rendezvous variables and destroy the process group a single-process run leaves behind."""
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------- models


def _regression_data(num_samples: int, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, 4, generator=gen)
    w = torch.randn(4, 1, generator=gen)
    y = torch.sin(x @ w) + 0.1 * torch.randn(num_samples, 1, generator=gen)
    return TensorDataset(x, y)


class Regressor(L.LightningModule):
    """A two-layer MLP regressor with a mean squared error loss.

    Args:
        batch_size: batch size of the (unshuffled) training loader.
        num_samples: size of the generated training set.
        lr: SGD learning rate.
        bad_steps: ``{global_step: value}``: at that step ``on_after_backward`` fills the gradient of
            :data:`BAD_PARAM` with ``value`` (inf or NaN).
        optimizer_cls: the SGD class to use (a recording subclass in the clipping test).
    """

    def __init__(
        self,
        batch_size: int = 8,
        num_samples: int = 96,
        lr: float = 0.05,
        bad_steps: dict[int, float] | None = None,
        optimizer_cls: type[torch.optim.SGD] = torch.optim.SGD,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.lr = lr
        self.bad_steps = dict(bad_steps or {})
        self.optimizer_cls = optimizer_cls

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def on_after_backward(self) -> None:
        value = self.bad_steps.get(self.trainer.global_step)
        if value is not None:
            grad = self.get_parameter(BAD_PARAM).grad
            assert grad is not None
            grad.fill_(value)

    def configure_optimizers(self) -> Optimizer:
        return self.optimizer_cls(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_regression_data(self.num_samples), batch_size=self.batch_size, shuffle=False)


class RecordingSGD(torch.optim.SGD):
    """SGD that records the gradients it actually steps with: after Lightning's closure (backward),
    the ``on_before_optimizer_step`` hooks and gradient clipping."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.used: list[list[Tensor]] = []

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.used.append(
            [p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None]
        )
        super().step()
        return loss


class TinyGAN(L.LightningModule):
    """A GAN in manual optimization: per batch the discriminator steps twice, then the generator once.

    Optimizer 0 holds the generator, optimizer 1 the discriminator. Gradients are zeroed with
    ``set_to_none`` by each optimizer's own ``zero_grad``, so at a discriminator step the generator keeps
    stale gradients, and at the generator step the discriminator holds gradients too: neither may be
    touched by the other optimizer's filter step.
    """

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
        self.discriminator = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        z = torch.tanh(real[:, :2] * 3.0 + 0.5)  # a deterministic "noise" derived from the batch
        for _ in range(2):
            fake = self.generator(z).detach()
            loss_d = F.softplus(-self.discriminator(real)).mean() + F.softplus(self.discriminator(fake)).mean()
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()
        loss_g = F.softplus(-self.discriminator(self.generator(z))).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()

    def configure_optimizers(self) -> list[Optimizer]:
        opt_g = torch.optim.SGD(self.generator.parameters(), lr=0.1)
        opt_d = torch.optim.SGD(self.discriminator.parameters(), lr=0.1)
        return [opt_g, opt_d]

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(1)
        real = torch.randn(32, 3, generator=gen) * 0.5 + 1.0
        return DataLoader(TensorDataset(real), batch_size=8, shuffle=False)


class BackboneRegressor(L.LightningModule):
    """A regressor with a ``backbone`` (frozen, then unfrozen by ``BackboneFinetuning``) and a ``head``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self.head(self.backbone(x)), y)

    def configure_optimizers(self) -> Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_regression_data(24), batch_size=8, shuffle=False)


# ---------------------------------------------------------------------------------------------- recording


@dataclass
class StepRecord:
    """What a :class:`Recorder` saw at one ``on_before_optimizer_step``.

    Attributes:
        global_step: ``trainer.global_step`` at the hook.
        epoch: ``trainer.current_epoch``.
        optimizer: index of the stepping optimizer in ``trainer.optimizers``.
        grads: gradients of the stepping optimizer's parameters that have one, by parameter name.
        others: gradients of the module's other parameters that have one.
        params: every parameter's value before this optimizer step.
        state: deep copy of the filter's ``state_dict()``.
        scale: the GradScaler's scale, if there is one.
    """

    global_step: int
    epoch: int
    optimizer: int
    grads: dict[str, Tensor]
    others: dict[str, Tensor]
    params: dict[str, Tensor]
    state: dict[str, Any]
    scale: float | None


class Recorder(Callback):
    """Records gradients, parameters and the filter state at every ``on_before_optimizer_step``.

    Placed before the :class:`GrokfastCallback` in the callback list it sees the raw gradients and the
    state before the filter step; placed after it, the filtered gradients and the state after the step.
    """

    def __init__(self, grokfast: GrokfastCallback) -> None:
        self.grokfast = grokfast
        self.records: list[StepRecord] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
        grads: dict[str, Tensor] = {}
        others: dict[str, Tensor] = {}
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                (grads if id(p) in mine else others)[name] = p.grad.detach().clone()
        assert mine <= set(names), "the optimizer holds tensors that are not parameters of the module"
        grad_filter = self.grokfast.grad_filter
        assert grad_filter is not None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.records.append(
            StepRecord(
                global_step=trainer.global_step,
                epoch=trainer.current_epoch,
                optimizer=next(i for i, opt in enumerate(trainer.optimizers) if opt is optimizer),
                grads=grads,
                others=others,
                params={n: p.detach().clone() for n, p in pl_module.named_parameters()},
                state=copy.deepcopy(grad_filter.state_dict()),
                scale=None if scaler is None else float(scaler.get_scale()),
            )
        )


class StepSpy(Callback):
    """Wraps the filter's ``step`` (instance attribute) to record the ``compute_stats`` it is called with."""

    def __init__(self, grokfast: GrokfastCallback) -> None:
        self.grokfast = grokfast
        self.calls: list[tuple[int, bool]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        grad_filter = self.grokfast.grad_filter
        assert grad_filter is not None
        original = grad_filter.step

        def spy(params: Any = None, *, compute_stats: bool = False) -> FilterStats:
            self.calls.append((trainer.global_step, compute_stats))
            return original(params, compute_stats=compute_stats)

        grad_filter.step = spy  # type: ignore[method-assign]


class ReferenceEMA:
    """The EMA filter restated naively in float64: per parameter, ``mu = g`` at its first gradient, then
    ``mu = alpha * mu + (1 - alpha) * g`` and ``g_hat = g + lamb * mu`` at every step it has a gradient."""

    def __init__(self, alpha: float, lamb: float) -> None:
        self.alpha = alpha
        self.lamb = lamb
        self.mu: dict[str, Tensor] = {}

    def step(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """Update the state from raw ``grads``; returns the filtered gradients."""
        out: dict[str, Tensor] = {}
        for name, grad in grads.items():
            g = grad.double()
            mu = self.mu.get(name)
            mu = g.clone() if mu is None else self.alpha * mu + (1.0 - self.alpha) * g
            self.mu[name] = mu
            out[name] = g + self.lamb * mu
        return out


def _trainer(root: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": root,
    }
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def _mus(state: dict[str, Any]) -> dict[str, Tensor]:
    return {name: entry["mu"] for name, entry in state["state"].items()}


def _assert_states_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bit for bit equality of two EMA filter states."""
    mus_a, mus_b = _mus(a), _mus(b)
    assert mus_a.keys() == mus_b.keys()
    for name in mus_a:
        assert torch.equal(mus_a[name], mus_b[name]), name


def _states_differ(a: dict[str, Any], b: dict[str, Any]) -> bool:
    mus_a, mus_b = _mus(a), _mus(b)
    return mus_a.keys() != mus_b.keys() or any(not torch.equal(mus_a[n], mus_b[n]) for n in mus_a)


def _assert_close(actual: dict[str, Tensor], expected: dict[str, Tensor], rtol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for name in actual:
        torch.testing.assert_close(actual[name].double(), expected[name].double(), rtol=rtol, atol=1e-7, msg=name)


def _global_norm(tensors: Any) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


@contextmanager
def _every_warning() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning, repeats included (pytest's ``recwarn`` uses the "default" action, which shows a
    repeated warning from the same place only once and so could not tell one warning from two)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _nonfinite_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "inf or NaN" in str(w.message)]


def _read_metrics(logger: CSVLogger) -> tuple[list[str], list[dict[str, str]]]:
    path = Path(logger.log_dir) / "metrics.csv"
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# ---------------------------------------------------------------------------------------------- 1. accumulation


def test_accumulation_filters_once_per_optimizer_step_on_the_accumulated_gradient(tmp_path: Path) -> None:
    """4 micro-batches of b accumulated == one batch of 4b: same filter state and weights (mean loss; Lightning
    divides the loss by 4). A filter fed every micro-batch (``on_after_backward``) would differ."""
    alpha, lamb, steps = 0.5, 2.0, 6
    runs: list[tuple[GrokfastCallback, Recorder, Regressor]] = []
    for batch_size, accumulate in ((4, 4), (16, 1)):
        grokfast = GrokfastCallback(alpha=alpha, lamb=lamb)
        raw = Recorder(grokfast)
        model = Regressor(batch_size=batch_size, num_samples=96)
        trainer = _trainer(tmp_path, [raw, grokfast], max_steps=steps, accumulate_grad_batches=accumulate)
        trainer.fit(model)
        assert trainer.global_step == steps
        runs.append((grokfast, raw, model))

    (acc_cb, acc_raw, acc_model), (big_cb, big_raw, big_model) = runs
    # the hook, and so the filter, ran once per optimizer step, never per micro-batch
    assert len(acc_raw.records) == len(big_raw.records) == steps
    for a, b in zip(acc_raw.records, big_raw.records):
        _assert_close(a.grads, b.grads, rtol=1e-5)
    assert acc_cb.grad_filter is not None and big_cb.grad_filter is not None
    _assert_close(_mus(acc_cb.grad_filter.state_dict()), _mus(big_cb.grad_filter.state_dict()), rtol=1e-5)
    _assert_close(dict(acc_model.named_parameters()), dict(big_model.named_parameters()), rtol=1e-5)
    # and that state is the EMA of the accumulated gradients, one update per optimizer step
    reference = ReferenceEMA(alpha, lamb)
    for record in acc_raw.records:
        reference.step(record.grads)
    _assert_close(_mus(acc_cb.grad_filter.state_dict()), reference.mu, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- 2. inf / NaN


def _precision_options(precision: str) -> dict[str, Any]:
    if precision == "16-mixed":
        # a small initial scale, so that the fp16 backward of this tiny model never overflows by itself
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    return {"precision": precision}


def _skipped_column(rows: list[dict[str, str]], key: str = "grokfast/skipped_steps") -> dict[int, float]:
    return {int(row["step"]): float(row[key]) for row in rows if row.get(key)}


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
def test_nonfinite_gradient_with_grad_scaler_is_skipped_and_training_goes_on(tmp_path: Path, value: float) -> None:
    """16-mixed with a GradScaler: at a bad step the state is untouched bit for bit and the inf/NaN gradients
    are passed on as they are, so the scaler skips ``optimizer.step()`` and halves its scale; training and
    the filter go on afterwards. One warning for two bad steps; the counter is logged."""
    bad, steps, alpha, lamb = (2, 5), 9, 0.8, 2.0
    grokfast = GrokfastCallback(alpha=alpha, lamb=lamb)
    before, after = Recorder(grokfast), Recorder(grokfast)
    logger = CSVLogger(tmp_path, name="fp16")
    model = Regressor(bad_steps=dict.fromkeys(bad, value))
    trainer = _trainer(
        tmp_path,
        [before, grokfast, after],
        max_steps=steps,
        logger=logger,
        log_every_n_steps=1,
        **_precision_options("16-mixed"),
    )
    with _every_warning() as caught:
        trainer.fit(model)

    assert trainer.global_step == steps
    assert [r.global_step for r in before.records] == list(range(steps))
    for k in range(steps):
        pre, post = before.records[k], after.records[k]
        if k in bad:
            assert not torch.isfinite(pre.grads[BAD_PARAM]).any()
            # the state is untouched bit for bit ...
            _assert_states_equal(pre.state, post.state)
            # ... and every gradient is passed on unchanged (unfiltered, still inf/NaN)
            assert pre.grads.keys() == post.grads.keys()
            for name in pre.grads:
                torch.testing.assert_close(post.grads[name], pre.grads[name], rtol=0, atol=0, equal_nan=True)
            # so the scaler skipped the step: weights unchanged, scale halved
            nxt = before.records[k + 1]
            for name in pre.params:
                assert torch.equal(nxt.params[name], pre.params[name]), name
            assert pre.scale is not None and nxt.scale == pre.scale / 2
        else:
            assert all(torch.isfinite(g).all() for g in pre.grads.values())
            assert _states_differ(pre.state, post.state), f"the filter did not step at good step {k}"
            if k + 1 < steps:
                nxt = before.records[k + 1]
                assert not torch.equal(nxt.params[BAD_PARAM], pre.params[BAD_PARAM])
                assert nxt.scale == pre.scale
    # the filter saw unscaled gradients: step 0's matches a recomputation without the scaler (fp16 autocast
    # rounding aside; a still-scaled gradient would be 1024 times larger)
    x, y = model.train_dataloader().dataset[: model.batch_size]
    params = {n.removeprefix("net."): p.clone().requires_grad_() for n, p in before.records[0].params.items()}
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.mse_loss(torch.func.functional_call(model.net, params, (x,)), y)
    expected = dict(zip(before.records[0].grads, torch.autograd.grad(loss, list(params.values()))))
    _assert_close(before.records[0].grads, expected, rtol=2e-2)
    # training and the filter went on after the last bad step, with a finite state ...
    final = grokfast.grad_filter
    assert final is not None and final.skipped_steps == len(bad)
    assert _states_differ(after.records[bad[-1]].state, final.state_dict())
    assert all(torch.isfinite(mu).all() for mu in _mus(final.state_dict()).values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # ... which is the EMA of the good steps' raw gradients
    reference = ReferenceEMA(alpha, lamb)
    for record in before.records:
        if record.global_step not in bad:
            reference.step(record.grads)
    _assert_close(_mus(final.state_dict()), reference.mu, rtol=1e-5)
    # one warning for two skipped steps
    assert len(_nonfinite_warnings(caught)) == 1, _nonfinite_warnings(caught)
    # the counter is logged at every step
    _, rows = _read_metrics(logger)
    assert _skipped_column(rows) == {k: float(sum(b <= k for b in bad)) for k in range(steps)}


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_nonfinite_gradient_without_scaler_leaves_the_state_intact(
    tmp_path: Path, precision: str, value: float
) -> None:
    """32-true and bf16-mixed (no GradScaler): the filter skips the bad step bit for bit, counts and warns.

    Nothing skips ``optimizer.step()`` there, so SGD steps on the inf/NaN gradient that the filter passed
    on unchanged: that parameter becomes non-finite, every later loss and gradient is NaN, and the filter
    skips each later step too (counted, with no further warning). Its state stays that of the last good
    step, finite, which is what a resume from an earlier checkpoint needs; the model itself is lost.
    """
    bad, steps = 3, 6
    grokfast = GrokfastCallback(alpha=0.8, lamb=2.0)
    before, after = Recorder(grokfast), Recorder(grokfast)
    logger = CSVLogger(tmp_path, name=precision)
    model = Regressor(bad_steps={bad: value})
    trainer = _trainer(
        tmp_path,
        [before, grokfast, after],
        max_steps=steps,
        logger=logger,
        log_every_n_steps=1,
        **_precision_options(precision),
    )
    with _every_warning() as caught:
        trainer.fit(model)

    assert [r.global_step for r in before.records] == list(range(steps))
    for k in range(bad):
        assert _states_differ(before.records[k].state, after.records[k].state)
    pre, post = before.records[bad], after.records[bad]
    assert not torch.isfinite(pre.grads[BAD_PARAM]).any()
    _assert_states_equal(pre.state, post.state)
    for name in pre.grads:
        torch.testing.assert_close(post.grads[name], pre.grads[name], rtol=0, atol=0, equal_nan=True)
    # what the optimizer did with it: the bad parameter is non-finite after the step, the others finite
    nxt = before.records[bad + 1]
    assert not torch.isfinite(nxt.params[BAD_PARAM]).any()
    assert all(torch.isfinite(p).all() for n, p in nxt.params.items() if n != BAD_PARAM)
    # from then on every step is non-finite and skipped; the state stays that of the last good step
    final = grokfast.grad_filter
    assert final is not None and final.skipped_steps == steps - bad
    _assert_states_equal(final.state_dict(), pre.state)
    assert all(torch.isfinite(mu).all() for mu in _mus(final.state_dict()).values())
    assert len(_nonfinite_warnings(caught)) == 1, _nonfinite_warnings(caught)
    _, rows = _read_metrics(logger)
    assert _skipped_column(rows) == {k: float(max(0, k - bad + 1)) for k in range(steps)}


def test_skipped_step_reports_no_stale_diagnostics(tmp_path: Path) -> None:
    """At a skipped step the logger must not show the previous step's amplification/slow_ratio/cosine as if
    they were this step's (Lightning keeps re-sending an on_step value that was not logged again)."""
    bad, steps = 2, 3
    logger = CSVLogger(tmp_path, name="stale")
    trainer = _trainer(tmp_path, [GrokfastCallback()], max_steps=steps, logger=logger, log_every_n_steps=1)
    with pytest.warns(RuntimeWarning, match="inf or NaN"):
        trainer.fit(Regressor(bad_steps={bad: math.nan}))
    _, rows = _read_metrics(logger)
    by_step = {int(row["step"]): row for row in rows}
    assert by_step[bad]["grokfast/skipped_steps"] == "1.0"
    assert by_step[bad - 1]["grokfast/amplification"]  # logged at the good step before
    for key in ("amplification", "slow_ratio", "cosine"):
        value = by_step[bad][f"grokfast/{key}"]
        assert value == "" or math.isnan(float(value)), f"stale grokfast/{key}={value} at a skipped step"


# ---------------------------------------------------------------------------------------------- 3. clipping


def test_gradient_clipping_acts_on_the_filtered_gradient_and_state_on_the_raw_one(tmp_path: Path) -> None:
    """``gradient_clip_val`` clips what the filter produced (Lightning clips after ``on_before_optimizer_step``),
    so the optimizer never sees a gradient above the clip norm even with a large lamb; the filter state is
    built from the raw, unclipped gradients."""
    clip, alpha, lamb, steps = 0.2, 0.9, 10.0, 6
    grokfast = GrokfastCallback(alpha=alpha, lamb=lamb)
    before, after = Recorder(grokfast), Recorder(grokfast)
    model = Regressor(optimizer_cls=RecordingSGD)
    trainer = _trainer(
        tmp_path,
        [before, grokfast, after],
        max_steps=steps,
        gradient_clip_val=clip,
        gradient_clip_algorithm="norm",
    )
    trainer.fit(model)

    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, RecordingSGD) and len(optimizer.used) == steps
    names = [n for n, _ in model.named_parameters()]
    reference = ReferenceEMA(alpha, lamb)
    raw_above_clip = 0
    for k in range(steps):
        raw, filtered = before.records[k].grads, after.records[k].grads
        used = dict(zip(names, optimizer.used[k]))
        expected_filtered = reference.step(raw)
        _assert_close(filtered, expected_filtered)
        raw_norm, filtered_norm, used_norm = (_global_norm(g.values()) for g in (raw, filtered, used))
        raw_above_clip += raw_norm > clip
        assert filtered_norm > clip
        assert used_norm <= clip * (1 + 1e-5)
        # clip_grad_norm_ scales the filtered gradient by clip / (norm + 1e-6): same direction, norm = clip
        scale = clip / (filtered_norm + 1e-6)
        _assert_close(used, {n: g * scale for n, g in filtered.items()}, rtol=1e-5)
    # the raw gradient exceeded the clip norm too, so a state built from clipped gradients would differ
    assert raw_above_clip >= 1
    assert grokfast.grad_filter is not None
    _assert_close(_mus(grokfast.grad_filter.state_dict()), reference.mu)


# ---------------------------------------------------------------------------------------------- 4. manual, 2 optimizers


def test_manual_optimization_with_two_optimizers_filters_each_optimizer_on_its_own_steps(tmp_path: Path) -> None:
    """GAN-style manual optimization (D steps twice, then G, per batch): every ``opt.step()`` filters that
    optimizer's parameters once, with their own state, and leaves the other optimizer's gradients alone;
    the logged keys carry the ``_opt{index}`` suffix."""
    alpha, lamb, batches = 0.7, 2.0, 4
    grokfast = GrokfastCallback(alpha=alpha, lamb=lamb)
    before, after = Recorder(grokfast), Recorder(grokfast)
    logger = CSVLogger(tmp_path, name="gan")
    model = TinyGAN()
    trainer = _trainer(tmp_path, [before, grokfast, after], max_epochs=1, logger=logger, log_every_n_steps=1)
    trainer.fit(model)

    assert [r.optimizer for r in before.records] == [1, 1, 0] * batches
    generator = {n for n, _ in model.named_parameters() if n.startswith("generator.")}
    discriminator = {n for n, _ in model.named_parameters() if n.startswith("discriminator.")}
    reference = ReferenceEMA(alpha, lamb)
    for pre, post in zip(before.records, after.records):
        assert set(pre.grads) == (generator if pre.optimizer == 0 else discriminator)
        _assert_close(post.grads, reference.step(pre.grads))
        # the other optimizer's parameters (stale or fresh gradients alike) are left unfiltered
        assert pre.others.keys() == post.others.keys()
        for name, grad in pre.others.items():
            assert torch.equal(post.others[name], grad), name
        # and keep their state
        assert set(pre.others) <= generator | discriminator
        for name in pre.others:
            if name in pre.state["state"]:
                assert torch.equal(post.state["state"][name]["mu"], pre.state["state"][name]["mu"]), name
    assert any(pre.others for pre in before.records if pre.optimizer == 0)  # D held gradients at G's steps
    assert grokfast.grad_filter is not None
    _assert_close(_mus(grokfast.grad_filter.state_dict()), reference.mu)

    columns, rows = _read_metrics(logger)
    grokfast_columns = {c for c in columns if c.startswith("grokfast/")}
    assert grokfast_columns == {
        f"grokfast/{key}_opt{i}" for key in ("amplification", "slow_ratio", "cosine", "skipped_steps") for i in (0, 1)
    }
    assert all(row["grokfast/amplification_opt0"] and row["grokfast/amplification_opt1"] for row in rows)


# ---------------------------------------------------------------------------------------------- 5. unfreezing


def test_backbone_unfrozen_mid_training_joins_the_filter_from_its_first_gradient(tmp_path: Path) -> None:
    """``BackboneFinetuning`` freezes the backbone, then adds it to the optimizer at epoch 2: it has no filter
    state before, its state starts as a copy of its first gradient, and then follows the EMA."""
    alpha, lamb, unfreeze_epoch = 0.8, 2.0, 2
    grokfast = GrokfastCallback(alpha=alpha, lamb=lamb)
    before, after = Recorder(grokfast), Recorder(grokfast)
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=unfreeze_epoch)
    model = BackboneRegressor()
    trainer = _trainer(tmp_path, [finetuning, before, grokfast, after], max_epochs=unfreeze_epoch + 2)
    trainer.fit(model)

    backbone = {n for n, _ in model.named_parameters() if n.startswith("backbone.")}
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert len(trainer.optimizers[0].param_groups) == 2  # the backbone did join
    reference = ReferenceEMA(alpha, lamb)
    first_joined = None
    for pre, post in zip(before.records, after.records):
        joined = pre.epoch >= unfreeze_epoch
        assert set(pre.grads) == (head | backbone if joined else head)
        if not joined:
            assert not backbone & set(post.state["state"]), "frozen parameters got filter state"
        elif first_joined is None:
            first_joined = pre.global_step
            assert not backbone & set(pre.state["state"])
            for name in backbone:  # mu starts as an exact copy of the first gradient
                assert torch.equal(post.state["state"][name]["mu"], pre.grads[name]), name
        _assert_close(post.grads, reference.step(pre.grads))
        _assert_close(_mus(post.state), reference.mu)
    assert first_joined is not None and first_joined > 0
    assert grokfast.grad_filter is not None
    _assert_close(_mus(grokfast.grad_filter.state_dict()), reference.mu)


# ---------------------------------------------------------------------------------------------- 6. strategies


class _SubclassedFSDP(FSDPStrategy):
    """A user's subclass of FSDP: refused as FSDP."""


class _SubclassedDDP(DDPStrategy):
    """A user's subclass of DDP: supported as DDP."""


def _deepspeed_strategy() -> Strategy:
    try:
        return DeepSpeedStrategy()
    except MisconfigurationException:
        # DeepSpeed is not installed and its __init__ refuses to run. The callback only reads the strategy's
        # type, so an uninitialised instance of the real class serves.
        return DeepSpeedStrategy.__new__(DeepSpeedStrategy)


@pytest.mark.parametrize(
    ("make_strategy", "name"),
    [
        (FSDPStrategy, "FSDPStrategy"),
        (_SubclassedFSDP, "_SubclassedFSDP"),
        (_deepspeed_strategy, "DeepSpeedStrategy"),
    ],
    ids=["fsdp", "fsdp-subclass", "deepspeed"],
)
def test_sharded_strategies_are_refused_in_setup(
    tmp_path: Path, make_strategy: Callable[[], Strategy], name: str
) -> None:
    """Lightning refuses FSDP on CPU before any callback runs, and DeepSpeed may not be installed, so the
    callback's ``setup`` is called directly with a real Trainer whose strategy is swapped for the instance."""
    trainer = _trainer(tmp_path, [])
    trainer._accelerator_connector.strategy = make_strategy()
    assert type(trainer.strategy).__name__ == name
    grokfast = GrokfastCallback()
    with pytest.raises(ValueError, match=f"does not support {name}") as err:
        grokfast.setup(trainer, Regressor(), "fit")
    message = str(err.value)
    assert "Supported: single device" in message and "'ddp'" in message and "'ddp_spawn'" in message


@pytest.mark.usefixtures("clean_process_group")
def test_model_parallel_strategy_is_refused_by_a_real_fit(tmp_path: Path) -> None:
    """``ModelParallelStrategy`` gets as far as setup on CPU: the fit stops there with the error."""
    grokfast = GrokfastCallback()
    trainer = _trainer(tmp_path, [grokfast], strategy=ModelParallelStrategy(), max_steps=2)
    with pytest.raises(ValueError, match=r"does not support ModelParallelStrategy.*Supported: single device"):
        trainer.fit(Regressor())
    assert grokfast.grad_filter is None


@pytest.mark.usefixtures("clean_process_group")
def test_ddp_subclass_works_normally(tmp_path: Path) -> None:
    """A subclass of DDPStrategy (one CPU process, gloo) trains and filters as usual."""
    alpha, lamb = 0.8, 2.0
    grokfast = GrokfastCallback(alpha=alpha, lamb=lamb)
    before, after = Recorder(grokfast), Recorder(grokfast)
    strategy = _SubclassedDDP(process_group_backend="gloo")
    trainer = _trainer(tmp_path, [before, grokfast, after], strategy=strategy, max_steps=3)
    trainer.fit(Regressor())
    assert trainer.strategy is strategy and trainer.global_step == 3
    reference = ReferenceEMA(alpha, lamb)
    for pre, post in zip(before.records, after.records):
        _assert_close(post.grads, reference.step(pre.grads))
    assert grokfast.grad_filter is not None
    _assert_close(_mus(grokfast.grad_filter.state_dict()), reference.mu)


# ---------------------------------------------------------------------------------------------- 7. diagnostics


def test_diagnostics_match_the_recorded_gradients_on_logging_steps_only(tmp_path: Path) -> None:
    """amplification = ||g_hat|| / ||g||, slow_ratio = ||g_hat - g|| / ||g||, cosine = cos(g, g_hat - g), logged
    (and computed) only on the steps that reach the logger."""
    steps, every = 9, 3
    grokfast = GrokfastCallback(alpha=0.8, lamb=2.0)
    before, after, spy = Recorder(grokfast), Recorder(grokfast), StepSpy(grokfast)
    logger = CSVLogger(tmp_path, name="diag")
    trainer = _trainer(
        tmp_path, [before, grokfast, after, spy], max_steps=steps, logger=logger, log_every_n_steps=every
    )
    trainer.fit(Regressor())

    logging_steps = [k for k in range(steps) if (k + 1) % every == 0]
    assert spy.calls == [(k, k in logging_steps) for k in range(steps)]
    columns, rows = _read_metrics(logger)
    keys = ("amplification", "slow_ratio", "cosine", "skipped_steps")
    assert {f"grokfast/{key}" for key in keys} <= set(columns)
    logged = {int(row["step"]): row for row in rows if any(row[f"grokfast/{key}"] for key in keys)}
    assert sorted(logged) == logging_steps
    for k in logging_steps:
        row = logged[k]
        assert all(row[f"grokfast/{key}"] for key in keys)
        raw, filtered = before.records[k].grads, after.records[k].grads
        slow = {n: filtered[n] - raw[n] for n in raw}
        raw_norm, filtered_norm, slow_norm = (_global_norm(g.values()) for g in (raw, filtered, slow))
        dot = sum(float((raw[n].double() * slow[n].double()).sum()) for n in raw)
        assert float(row["grokfast/amplification"]) == pytest.approx(filtered_norm / raw_norm, rel=1e-5)
        assert float(row["grokfast/slow_ratio"]) == pytest.approx(slow_norm / raw_norm, rel=1e-5)
        assert float(row["grokfast/cosine"]) == pytest.approx(dot / (raw_norm * slow_norm), rel=1e-5)
        assert float(row["grokfast/skipped_steps"]) == 0.0


def test_no_statistics_without_a_logger(tmp_path: Path) -> None:
    """With ``logger=False`` nothing is logged, so the filter never pays for the statistics."""
    steps = 6
    grokfast = GrokfastCallback()
    spy = StepSpy(grokfast)
    trainer = _trainer(tmp_path, [grokfast, spy], max_steps=steps, log_every_n_steps=1)
    trainer.fit(Regressor())
    assert spy.calls == [(k, False) for k in range(steps)]
    assert grokfast.grad_filter is not None and grokfast.grad_filter.state


def test_log_diagnostics_false_logs_only_the_skip_counter(tmp_path: Path) -> None:
    """``log_diagnostics=False``: no statistics computed, no amplification/slow_ratio/cosine columns, but
    ``grokfast/skipped_steps`` is still logged on the logging steps."""
    steps, every = 6, 3
    grokfast = GrokfastCallback(log_diagnostics=False)
    spy = StepSpy(grokfast)
    logger = CSVLogger(tmp_path, name="nodiag")
    trainer = _trainer(tmp_path, [grokfast, spy], max_steps=steps, logger=logger, log_every_n_steps=every)
    trainer.fit(Regressor())
    assert spy.calls == [(k, False) for k in range(steps)]
    columns, rows = _read_metrics(logger)
    assert {c for c in columns if c.startswith("grokfast/")} == {"grokfast/skipped_steps"}
    assert _skipped_column(rows) == {2: 0.0, 5: 0.0}


class SkippingRegressor(Regressor):
    """The README's remedy without a GradScaler: skip the optimizer step when a gradient is non-finite."""

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
            optimizer.zero_grad(set_to_none=True)


def test_readme_remedy_skips_the_optimizer_step_without_a_scaler(tmp_path: Path) -> None:
    bad, steps = 2, 5
    grokfast = GrokfastCallback(alpha=0.8, lamb=2.0)
    before = Recorder(grokfast)
    model = SkippingRegressor(bad_steps={bad: math.nan})
    trainer = _trainer(tmp_path, [before, grokfast], max_steps=steps)
    with pytest.warns(RuntimeWarning, match="inf or NaN"):
        trainer.fit(model)
    for name, p in before.records[bad].params.items():  # the bad step changed no weight
        assert torch.equal(before.records[bad + 1].params[name], p), name
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert grokfast.grad_filter is not None and grokfast.grad_filter.skipped_steps == 1
