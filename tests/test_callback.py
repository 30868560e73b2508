"""The callbacks in a real Trainer: arguments, parity with the naive references, stacking and order, strategies,
memory, diagnostics.

A recorder before the callback sees the raw gradients, one after it the transformed ones (``helpers.fit``). Every
filtered tensor must agree with the float64 reference to 1e-6 of the size of the filter's operands
(``helpers.assert_grads_close``).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
from helpers import (
    GradRecorder,
    Run,
    SGDModel,
    TinyModel,
    assert_grads_close,
    assert_state_equal,
    column,
    fit,
    make_trainer,
    max_rel_diff,
    naive_orthograd,
    norm,
    present,
    read_metrics,
    reference,
    regression_data,
    replay,
)
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy
from torch import nn
from torch.utils.data import DataLoader

from lightning_grokfast import EMAFilter, GrokfastCallback, OrthoGrad, OrthoGradCallback

# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("cls", [GrokfastCallback, OrthoGradCallback])
def test_every_argument_is_typed_documented_and_checked_in_the_constructor(cls: type) -> None:
    """LightningCLI builds its parser and --help from the type hints and the ``Args:`` docstring; a bad value of any
    argument, those of the filter not chosen too (``window_size`` with the default ``"ema"``), fails at once naming
    it (the messages of each check: ``test_transforms``)."""
    doc, params = inspect.getdoc(cls) or "", inspect.signature(cls).parameters
    for name, param in params.items():
        assert param.annotation is not inspect.Parameter.empty, name
        assert f"    {name}: " in doc, f"{name} missing from the Args: section"
        with pytest.raises(ValueError, match=f"`{name}` must be .* got <object"):
            cls(**{name: object()})
    with pytest.raises(ValueError, match=r"`filter` must be one of 'ema', 'ma', got 'sma'"):
        GrokfastCallback(filter="sma")


def test_lamb_defaults_to_the_papers_per_filter_and_numbers_are_stored_as_python_ones() -> None:
    assert GrokfastCallback().settings.lamb == 2.0 and GrokfastCallback(filter="ma").settings.lamb == 5.0
    assert GrokfastCallback(filter="ma", lamb=0.0).settings.lamb == 0.0
    cb = GrokfastCallback(alpha=np.float32(0.9), lamb=np.float64(1.0), window_size=np.int64(10))
    assert cb.config() == {"filter": "ema", "alpha": float(np.float32(0.9)), "lamb": 1.0}
    assert type(cb.settings.alpha) is float


# ---------------------------------------------------------------------------------------------- parity

STEPS, LATE_FROM = 32, 3  # 4 epochs of 8 batches; TinyModel.late gets a gradient from batch 3 of every epoch on
EMA_CASES = [(0.98, 2.0, None), (0.8, 0.1, None), (0.5, 5.0, None), (0.0, 1.0, None), (0.9, 2.0, False)]
MA_CASES = [(w, wu, red, None) for w in (1, 3, 7) for wu in (True, False) for red in ("mean", "sum")]
MA_CASES += [(3, True, "sum", False), (7, False, "mean", False)]


def run(steps: int = STEPS, logger: Any = False, **config: Any) -> Run:
    """Fit TinyModel with ``GrokfastCallback(**config)``, checking at every step that no state aliases a ``.grad``,
    that the raw recorder saw what ``backward()`` produced, and the gradient pattern: ``late`` has a gradient from
    batch LATE_FROM of each epoch on, ``frozen`` never, the others always."""
    produced = GradRecorder(hook="on_after_backward")
    result = fit(GrokfastCallback(**config), TinyModel(late_from=LATE_FROM), steps, True, callbacks=[produced],
                 logger=logger)  # fmt: skip
    assert len(result.raw.steps) == len(result.filtered.steps) == steps
    assert_state_equal(result.raw.steps, produced.steps)
    for k, (raw, filtered) in enumerate(zip(result.raw.steps, result.filtered.steps)):
        assert (raw["late"] is None) == (filtered["late"] is None) == (k % 8 < LATE_FROM), k
        assert raw["frozen"] is None and filtered["frozen"] is None and raw["scale"] is not None
    return result


@pytest.mark.parametrize(("alpha", "lamb", "foreach"), EMA_CASES)
def test_ema_matches_reference(alpha: float, lamb: float, foreach: bool | None) -> None:
    """And the first filtered gradient of a parameter (``late`` from its first) is ``(1 + lamb) * g``."""
    result = run(alpha=alpha, lamb=lamb, foreach=foreach)
    assert_grads_close(result.filtered.steps, result.raw.steps, "ema", alpha=alpha, lamb=lamb)
    for name, k in (("net.0.weight", 0), ("late", LATE_FROM)):
        first, raw = result.filtered.steps[k][name], result.raw.steps[k][name]
        torch.testing.assert_close(first, (1 + lamb) * raw, rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize(("window_size", "warmup", "reduction", "foreach"), MA_CASES)
def test_ma_matches_reference(window_size: int, warmup: bool, reduction: str, foreach: bool | None) -> None:
    """With warm-up the first ``window_size - 1`` gradients of each parameter are left bit for bit; without (or
    with a window of 1) the first is ``(1 + lamb) * g``: a one-gradient window's mean and sum are g."""
    kwargs = {"window_size": window_size, "lamb": 2.0, "warmup": warmup, "reduction": reduction}
    result = run(filter="ma", foreach=foreach, **kwargs)
    assert_grads_close(result.filtered.steps, result.raw.steps, "ma", **kwargs)
    first = result.filtered.steps[0]["net.0.weight"], result.raw.steps[0]["net.0.weight"]
    if not warmup or window_size == 1:
        torch.testing.assert_close(first[0], 3.0 * first[1], rtol=1e-6, atol=0)
        return
    for name, k in (("net.0.weight", 0), ("net.2.bias", window_size - 2), ("late", LATE_FROM)):
        assert torch.equal(result.filtered.steps[k][name], result.raw.steps[k][name]), (name, k)


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_lamb_zero_leaves_raw_gradients_bit_for_bit_and_lamb_does_not(kind: str) -> None:
    inert = run(filter=kind, alpha=0.9, lamb=0.0, window_size=3, warmup=False)
    assert_state_equal(inert.filtered.steps, inert.raw.steps)
    raw, filtered, *_ = run(steps=4, filter=kind, alpha=0.9, lamb=2.0, window_size=3, warmup=False)
    assert max_rel_diff([{"w": raw.steps[2]["net.0.weight"]}], [{"w": filtered.steps[2]["net.0.weight"]}]) > 0.1


@pytest.mark.parametrize(
    ("kind", "kwargs"), [("ema", {"alpha": 0.9, "lamb": 5.0}), ("ma", {"window_size": 3, "lamb": 5.0, "warmup": False})]
)
def test_state_is_built_from_raw_gradients_and_diagnostics_change_nothing(
    tmp_path: Path, kind: str, kwargs: Any
) -> None:
    """With a logger the statistics are computed at every step; the filtered gradients stay those of the reference
    of raw gradients, and differ from a reference that feeds the filtered ones back."""
    raw, filtered, trainer, _ = run(steps=16, logger=CSVLogger(tmp_path), filter=kind, **kwargs)
    assert "grokfast/amplification" in trainer.callback_metrics  # the statistics did run
    good, bad = (replay(reference(kind, feedback=fb, **kwargs), raw.steps) for fb in (False, True))
    assert max_rel_diff(bad, good) > 0.1 and max_rel_diff(filtered.steps, bad) > 0.1
    assert_grads_close(filtered.steps, raw.steps, kind, **kwargs)


@pytest.mark.parametrize(
    ("kind", "kwargs"), [("ema", {"alpha": 0.9, "lamb": 2.0}), ("ma", {"window_size": 5, "lamb": 5.0, "warmup": True})]
)
def test_gradients_reused_in_place_change_nothing(kind: str, kwargs: dict[str, Any]) -> None:
    """``zero_grad(set_to_none=False)`` refills the same ``.grad`` tensors in place: no gradient, weight or state
    differs from new tensors every step (and none counts as already transformed)."""
    runs = [fit(GrokfastCallback(filter=kind, **kwargs), TinyModel(set_to_none=s), 20, True) for s in (True, False)]
    assert all(runs[0].model.zeroed_to_none) and not any(runs[1].model.zeroed_to_none[1:])  # the override took
    for a, b in zip(runs[0], runs[1]):
        if isinstance(a, GradRecorder):
            assert_state_equal(a.steps, b.steps)
    assert_state_equal(runs[0].model.state_dict(), runs[1].model.state_dict())
    assert_state_equal(*(r.raw.of.transform.state_dict() for r in runs))
    assert runs[1].raw.of.transform.repeated_steps == 0


class LayersInConfigureModel(L.LightningModule):
    """Creates its layers in ``configure_model`` (after the callbacks' ``setup``), as models too large to build
    twice do."""

    def configure_model(self) -> None:
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(regression_data(), batch_size=8)


def test_a_model_that_creates_its_layers_in_configure_model_is_filtered() -> None:
    raw, filtered, *_ = fit(GrokfastCallback(alpha=0.8), LayersInConfigureModel(), 4)
    assert len(present(raw.steps[0])) == 4
    assert_grads_close(filtered.steps, raw.steps, "ema", alpha=0.8, lamb=2.0)


# ---------------------------------------------------------------------------------------------- stacking and order


def test_two_grokfast_callbacks_are_refused_naming_both_and_the_cli() -> None:
    """Another filter (another state key): refused in ``setup``, before any step; the same one: by Lightning."""
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        make_trainer(callbacks=[GrokfastCallback(alpha=0.9), GrokfastCallback(alpha=0.8, lamb=1.0)])
    trainer = make_trainer(callbacks=[GrokfastCallback(), GrokfastCallback(filter="ma", window_size=7)], max_steps=2)
    model = TinyModel()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="The Trainer holds 2 GrokfastCallbacks") as err:
        trainer.fit(model)
    assert "GrokfastCallback(filter='ema', alpha=0.98, lamb=2.0)" in str(err.value) and "callbacks+=" in str(err.value)
    assert "GrokfastCallback(filter='ma', window_size=7, lamb=5.0, warmup=True, reduction='mean')" in str(err.value)
    assert trainer.global_step == 0 and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match=r"OrthoGradCallback\(apply_to='all'\) and .*apply_to='matrices'"):
        make_trainer(callbacks=[OrthoGradCallback(), OrthoGradCallback(apply_to="matrices")]).fit(SGDModel())


@pytest.mark.parametrize("orthograd_first", [False, True], ids=["grokfast_first", "orthograd_first"])
def test_grokfast_then_orthograd_whatever_the_order_listed(orthograd_first: bool) -> None:
    """Listed in either order, the Trainer gives bit for bit the weights of a plain loop running EMAFilter on the raw
    gradient and then OrthoGrad on the filtered one; the other order gives other weights."""
    steps, alpha, lamb = 8, 0.8, 2.0
    pair: list[Callback] = [GrokfastCallback(alpha=alpha, lamb=lamb), OrthoGradCallback()]
    got = fit(None, SGDModel(lr=0.2), max_steps=steps, callbacks=pair[::-1] if orthograd_first else pair).model

    def plain(ema_first: bool) -> dict[str, torch.Tensor]:
        model = SGDModel(lr=0.2)
        opt = model.configure_optimizers()
        ema, ortho = EMAFilter(model.named_parameters(), alpha, lamb), OrthoGrad(model.named_parameters())
        for i, batch in zip(range(steps), model.train_dataloader()):
            opt.zero_grad()
            model.training_step(batch, i).backward()
            for t in (ema, ortho) if ema_first else (ortho, ema):
                t.step()
            opt.step()
        return {n: p.detach() for n, p in model.named_parameters()}

    right, wrong = plain(True), plain(False)
    assert all(torch.equal(p, right[n]) for n, p in got.named_parameters())
    assert any(not torch.allclose(p, wrong[n], atol=1e-4) for n, p in got.named_parameters())


def test_orthograd_callback_steps_the_optimizer_on_the_transformed_gradient() -> None:
    """SGD moves every weight by exactly the reference ⊥Grad of its raw gradient; the 0-d ``scale`` never moves (its
    gradient becomes 0), the frozen parameter neither, and ``late`` has no gradient on its first batches."""
    lr, model = 0.5, SGDModel(lr=0.5, late_from=2)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = fit(OrthoGradCallback(), model, max_steps=6)
    after = [*result.raw.params[1:], {n: p.detach() for n, p in model.named_parameters()}]
    for k, (w0, w1, raw) in enumerate(zip(result.raw.params, after, result.raw.steps)):
        for name, g in raw.items():
            if g is None:
                assert torch.equal(w1[name], w0[name]) and result.filtered.steps[k][name] is None, (k, name)
                continue
            expected = naive_orthograd(w0[name], g)
            torch.testing.assert_close(result.filtered.steps[k][name].double(), expected, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close((w0[name].double() - w1[name].double()) / lr, expected, rtol=1e-5, atol=1e-6)
    assert result.raw.steps[0]["late"] is None and result.raw.steps[3]["late"] is not None
    assert torch.equal(model.scale, initial["scale"]) and torch.equal(model.frozen, initial["frozen"])


# ---------------------------------------------------------------------------------------------- strategies


class SubclassedFSDP(FSDPStrategy):
    """A user's subclass of FSDP: refused as FSDP."""


def strategy(package: str, name: str) -> Strategy:
    """An instance of ``package.strategies.name`` (``pytorch_lightning`` has classes of its own); uninitialised where
    the constructor needs what is missing here (DeepSpeed)."""
    cls = getattr(importlib.import_module(f"{package}.strategies"), name)
    try:
        return cls()
    except Exception:
        return cls.__new__(cls)


PACKAGES, REFUSED = ("lightning.pytorch", "pytorch_lightning"), ("FSDPStrategy", "DeepSpeedStrategy")
REFUSED = [(package, name) for package in PACKAGES for name in REFUSED]


@pytest.mark.parametrize("refused", [*REFUSED, None], ids=["fsdp", "deepspeed", "pl-fsdp", "pl-deepspeed", "subclass"])
@pytest.mark.parametrize("cls", [GrokfastCallback, OrthoGradCallback])
def test_unsupported_strategies_are_refused_in_setup_naming_the_way_to_shard(refused: Any, cls: type) -> None:
    """FSDP1 and DeepSpeed, under either package name, and a user's subclass: Lightning refuses FSDP on CPU before any
    callback runs and DeepSpeed may be missing, so ``setup`` is called directly, on a real Trainer whose strategy is
    swapped."""
    trainer = make_trainer()
    trainer._accelerator_connector.strategy = SubclassedFSDP() if refused is None else strategy(*refused)
    with pytest.raises(ValueError, match=f"does not support {type(trainer.strategy).__name__}.*ModelParallelStrategy"):
        cls().setup(trainer, TinyModel(), "fit")


@pytest.fixture
def clean_process_group(monkeypatch: pytest.MonkeyPatch) -> Any:
    """No inherited rendezvous variables; destroy the process group a single-process run leaves behind."""
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.usefixtures("clean_process_group")
def test_a_ddp_subclass_trains_and_filters_as_usual() -> None:
    class SubclassedDDP(DDPStrategy):
        pass

    strategy = SubclassedDDP(process_group_backend="gloo")
    raw, filtered, trainer, _ = fit(GrokfastCallback(alpha=0.8, lamb=2.0), None, 3, strategy=strategy)
    assert trainer.strategy is strategy and trainer.global_step == 3
    assert_grads_close(filtered.steps, raw.steps, "ema", alpha=0.8, lamb=2.0)


# ---------------------------------------------------------------------------------------------- memory


def test_a_state_that_cannot_fit_is_refused_in_setup_before_anything_is_allocated(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import lightning_grokfast.transform as transform

    model = TinyModel(hidden=300)
    numel = sum(p.numel() for p in model.parameters())
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        make_trainer(callbacks=[GrokfastCallback(filter="ma", window_size=7)], max_steps=2).fit(TinyModel(hidden=300))
    logged = [r.getMessage() for r in caplog.records if "state will hold" in r.getMessage()]
    assert len(logged) == 1 and f"{8 * numel * 4 / 1024:.1f} KiB" in logged[0] and f"{numel:,}" in logged[0]
    monkeypatch.setattr(transform, "available_memory", lambda device: 10_000)
    grokfast = GrokfastCallback(filter="ma", window_size=100)
    trainer = make_trainer(callbacks=[grokfast], max_steps=2)
    with pytest.raises(MemoryError) as err:
        trainer.fit(model)
    assert f"{101 * numel * 4 / 1024:.1f} KiB" in str(err.value) and f"{numel:,}" in str(err.value)
    assert "window_size + 1 = 101 copies" in str(err.value) and "smaller `window_size`" in str(err.value)
    assert trainer.global_step == 0 and not grokfast.transform.state


# ---------------------------------------------------------------------------------------------- diagnostics


def spied_fit(tmp_path: Path, callback: Any, steps: int, every: int, logger: bool = True) -> Any:
    """Fit, recording the ``compute_stats`` of every transform step; returns (run, [compute_stats], metric rows)."""
    cls = EMAFilter if isinstance(callback, GrokfastCallback) else OrthoGrad
    with mock.patch.object(cls, "step", autospec=True, side_effect=cls.step) as spy:
        csv_logger = CSVLogger(tmp_path) if logger else False
        result = fit(callback, SGDModel(lr=0.2), steps, logger=csv_logger, log_every_n_steps=every)
    calls = [c.kwargs.get("compute_stats", False) for c in spy.call_args_list]
    return result, calls, read_metrics(csv_logger) if logger else []


def test_diagnostics_are_computed_and_logged_on_logging_steps_only_and_match_the_gradients(tmp_path: Path) -> None:
    """amplification = |g_hat| / |g|, slow_ratio = |g_hat - g| / |g|, cosine = cos(g, g_hat - g); ⊥Grad's
    radial_fraction = |radial part| / |g|; every 3rd step only."""
    logging_steps = [2, 5, 8]
    for callback in (GrokfastCallback(alpha=0.8, lamb=2.0), OrthoGradCallback()):
        result, calls, rows = spied_fit(tmp_path / repr(callback), callback, 9, 3)
        assert calls == [k in logging_steps for k in range(9)]
        prefix = "grokfast" if isinstance(callback, GrokfastCallback) else "orthograd"
        assert column(rows, f"{prefix}/skipped_steps") == dict.fromkeys(logging_steps, 0.0)
        for k in logging_steps:
            raw, filtered, w = present(result.raw.steps[k]), present(result.filtered.steps[k]), result.raw.params[k]
            if prefix == "orthograd":
                radial = sum(float((w[n].double() * g.double()).sum()) ** 2 / float(w[n].double().square().sum())
                             for n, g in raw.items())  # fmt: skip
                assert column(rows, "orthograd/radial_fraction")[k] == pytest.approx(math.sqrt(radial) / norm(raw))
                continue
            slow = {n: filtered[n] - raw[n] for n in raw}
            dot = sum(float((raw[n].double() * slow[n].double()).sum()) for n in raw)
            row = {key: column(rows, f"grokfast/{key}")[k] for key in ("amplification", "slow_ratio", "cosine")}
            assert row["amplification"] == pytest.approx(norm(filtered) / norm(raw), rel=1e-5)
            assert row["slow_ratio"] == pytest.approx(norm(slow) / norm(raw), rel=1e-5)
            assert row["cosine"] == pytest.approx(dot / (norm(raw) * norm(slow)), rel=1e-5)


def test_no_statistics_without_a_logger_and_only_the_skip_count_without_diagnostics(tmp_path: Path) -> None:
    result, calls, _ = spied_fit(tmp_path, GrokfastCallback(), 6, 1, logger=False)
    assert calls == [False] * 6 and result.raw.of.transform.state
    _, calls, rows = spied_fit(tmp_path, GrokfastCallback(log_diagnostics=False), 6, 3)
    assert calls == [False] * 6
    assert {k for row in rows for k, v in row.items() if k.startswith("grokfast/") and v} == {"grokfast/skipped_steps"}
