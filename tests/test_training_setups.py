"""GrokfastCallback under real Lightning training setups: accumulation, inf/NaN under 16-mixed (GradScaler), 32-true
and bf16-mixed, clipping, manual optimization with two optimizers, unfreezing, strategies, logged diagnostics.

Recorders before and after the callback (``helpers.fit``) see the raw and the filtered gradients and the filter
state before and after each step; they are checked against the naive EMA (the paper's Algorithm 2).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import GradRecorder, NaiveEMA, TinyModel, assert_state_equal, fit, make_trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import BackboneFinetuning
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_grokfast import EMAFilter, GrokfastCallback

BAD = "net.0.weight"  # the parameter whose gradient the non-finite tests overwrite with inf or NaN
close = partial(assert_state_equal, rtol=1e-6, atol=1e-7, check_dtype=False)


class Faulty(TinyModel):
    """At the global steps in ``bad``, ``on_after_backward`` fills the gradient of :data:`BAD` with inf or NaN."""

    def __init__(self, bad: dict[int, float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bad = bad

    def on_after_backward(self) -> None:
        if self.trainer.global_step in self.bad:
            self.get_parameter(BAD).grad.fill_(self.bad[self.trainer.global_step])


def mus(state: dict[str, Any]) -> dict[str, Tensor]:
    return {name: entry["mu"] for name, entry in state["state"].items()}


def present(grads: dict[str, Tensor | None], names: Any = None) -> dict[str, Tensor]:
    """The gradients that are there (of ``names`` only, if given)."""
    return {n: g for n, g in grads.items() if g is not None and (names is None or n in names)}


def norm(grads: dict[str, Tensor]) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))


def read_metrics(logger: CSVLogger) -> tuple[list[str], list[dict[str, str]]]:
    with (Path(logger.log_dir) / "metrics.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def column(rows: list[dict[str, str]], key: str = "grokfast/skipped_steps") -> dict[int, float]:
    return {int(row["step"]): float(row[key]) for row in rows if row.get(key)}


def nonfinite_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "inf or NaN" in str(w.message)]


def differs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two EMA filter states differ at all."""
    return mus(a).keys() != mus(b).keys() or any(not torch.equal(x, mus(b)[n]) for n, x in mus(a).items())


# ---------------------------------------------------------------------------------------------- accumulation


def test_accumulation_filters_once_per_optimizer_step_on_the_accumulated_gradient() -> None:
    """4 micro-batches of 4 accumulated == one batch of 16 (Lightning divides the loss by 4): the hook, and so the
    filter, runs once per optimizer step; same gradients, state and weights, the EMA of the accumulated gradient."""
    acc, big = (
        fit(GrokfastCallback(alpha=0.5, lamb=2.0), TinyModel(batch_size=b, samples=96), 6, accumulate_grad_batches=n)
        for b, n in ((4, 4), (16, 1))
    )
    assert acc.trainer.global_step == big.trainer.global_step == len(acc.raw.steps) == len(big.raw.steps) == 6
    close_5 = partial(assert_state_equal, rtol=1e-5, atol=1e-7)  # float32 sums in another order
    close_5(acc.raw.steps, big.raw.steps)
    close_5(mus(acc.raw.of.grad_filter.state_dict()), mus(big.raw.of.grad_filter.state_dict()))
    close_5(dict(acc.model.named_parameters()), dict(big.model.named_parameters()))
    reference = NaiveEMA(0.5, 2.0)
    for grads in acc.raw.steps:
        reference.step(grads)
    close_5(mus(acc.raw.of.grad_filter.state_dict()), reference.mu, check_dtype=False)


# ---------------------------------------------------------------------------------------------- inf / NaN


def run_faulty(tmp_path: Path, precision: str, bad: dict[int, float], steps: int, model: Any = Faulty) -> Any:
    """Fit ``model(bad)`` with ``GrokfastCallback(alpha=0.8, lamb=2)`` and a CSV logger; every warning recorded."""
    options: dict[str, Any] = {"precision": precision}
    if precision == "16-mixed":  # a small initial scale: the fp16 backward of this tiny model never overflows itself
        options = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))]}
    with warnings.catch_warnings(record=True) as caught:  # every warning, repeats included (unlike recwarn)
        warnings.simplefilter("always")
        result = fit(GrokfastCallback(alpha=0.8, lamb=2.0), model(bad), steps, logger=CSVLogger(tmp_path), **options)
    assert result.raw.global_steps == list(range(steps))
    return result, nonfinite_warnings(caught), read_metrics(result.trainer.logger)[1]


def assert_skipped(result: Any, k: int) -> None:
    """At step ``k`` the state is untouched bit for bit and every gradient is passed on unchanged (still inf/NaN)."""
    assert not torch.isfinite(result.raw.steps[k][BAD]).any()
    assert_state_equal(result.raw.states[k]["state"], result.filtered.states[k]["state"])
    assert_state_equal(result.filtered.steps[k], result.raw.steps[k], equal_nan=True)


SCALED_BAD, SCALED_STEPS, BARE_BAD, BARE_STEPS = (2, 5), 9, 3, 6


@pytest.fixture(scope="module", params=[math.inf, math.nan], ids=["inf", "nan"])
def scaled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """16-mixed with a GradScaler; the gradient of BAD is inf or NaN at steps 2 and 5 of 9."""
    return run_faulty(
        tmp_path_factory.mktemp("scaled"), "16-mixed", dict.fromkeys(SCALED_BAD, request.param), SCALED_STEPS
    )


@pytest.fixture(scope="module", params=[(p, v) for p in ("32-true", "bf16-mixed") for v in (math.inf, math.nan)])
def bare(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """No GradScaler (32-true, bf16-mixed); the gradient of BAD is inf or NaN at step 3 of 6."""
    precision, value = request.param
    return run_faulty(tmp_path_factory.mktemp("bare"), precision, {BARE_BAD: value}, BARE_STEPS)


def test_scaler_bad_steps_are_skipped_and_the_scaler_skips_the_optimizer_step(scaled: Any) -> None:
    """The filter passes the inf/NaN gradients on untouched, so the scaler skips the step and halves its scale."""
    raw = scaled[0].raw
    for k in SCALED_BAD:
        assert_skipped(scaled[0], k)
        assert_state_equal(raw.params[k + 1], raw.params[k])
        assert raw.scales[k + 1] == raw.scales[k] / 2


def test_scaler_good_steps_filter_and_step(scaled: Any) -> None:
    raw, filtered = scaled[0].raw, scaled[0].filtered
    for k in sorted(set(range(SCALED_STEPS)) - set(SCALED_BAD)):
        assert all(torch.isfinite(g).all() for g in present(raw.steps[k]).values())
        assert differs(raw.states[k], filtered.states[k]), f"the filter did not step at good step {k}"
        if k + 1 < SCALED_STEPS:
            assert not torch.equal(raw.params[k + 1][BAD], raw.params[k][BAD]) and raw.scales[k + 1] == raw.scales[k]


def test_scaler_hands_the_filter_unscaled_gradients(scaled: Any) -> None:
    """Step 0's gradients match a recomputation without the scaler (fp16 autocast rounding aside; still-scaled
    gradients would be 1024 times larger)."""
    model, raw = scaled[0].model, scaled[0].raw
    x, y = model.train_dataloader().dataset[:8]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.clone().requires_grad_(n in trainable) for n, p in raw.params[0].items()}
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.mse_loss(torch.func.functional_call(model, params, (x,)), y)
    expected = dict(zip(trainable, torch.autograd.grad(loss, [params[n] for n in trainable])))
    assert_state_equal(present(raw.steps[0]), expected, rtol=2e-2, atol=1e-7)


def test_scaler_training_and_filter_go_on_as_the_ema_of_the_good_steps(scaled: Any) -> None:
    result, final = scaled[0], scaled[0].raw.of.grad_filter
    assert final.skipped_steps == len(SCALED_BAD)
    assert differs(result.filtered.states[SCALED_BAD[-1]], final.state_dict())
    assert all(torch.isfinite(mu).all() for mu in mus(final.state_dict()).values())
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    reference = NaiveEMA(0.8, 2.0)
    for k in sorted(set(range(SCALED_STEPS)) - set(SCALED_BAD)):
        reference.step(result.raw.steps[k])
    close(mus(final.state_dict()), reference.mu, rtol=1e-5)


def test_scaler_one_warning_for_two_bad_steps_and_the_count_logged(scaled: Any) -> None:
    _, caught, rows = scaled
    assert len(caught) == 1, caught
    assert column(rows) == {k: float(sum(b <= k for b in SCALED_BAD)) for k in range(SCALED_STEPS)}


def test_bare_bad_step_is_skipped_bit_for_bit(bare: Any) -> None:
    raw, filtered = bare[0].raw, bare[0].filtered
    assert all(differs(raw.states[k], filtered.states[k]) for k in range(BARE_BAD))
    assert_skipped(bare[0], BARE_BAD)


def test_bare_optimizer_steps_on_it_so_the_bad_parameter_turns_nonfinite(bare: Any) -> None:
    """Nothing skips ``optimizer.step()`` without a scaler: the model is lost from there."""
    after = bare[0].raw.params[BARE_BAD + 1]
    assert not torch.isfinite(after[BAD]).any() and all(torch.isfinite(p).all() for n, p in after.items() if n != BAD)


def test_bare_later_steps_are_skipped_and_the_state_stays_that_of_the_last_good_step(bare: Any) -> None:
    """Every later gradient is NaN, skipped too; the state stays finite, what a resume from an earlier checkpoint
    needs."""
    result, final = bare[0], bare[0].raw.of.grad_filter
    assert final.skipped_steps == BARE_STEPS - BARE_BAD
    assert_state_equal(final.state_dict()["state"], result.raw.states[BARE_BAD]["state"])
    assert all(torch.isfinite(mu).all() for mu in mus(final.state_dict()).values())


def test_bare_one_warning_and_the_count_logged(bare: Any) -> None:
    _, caught, rows = bare
    assert len(caught) == 1, caught
    assert column(rows) == {k: float(max(0, k - BARE_BAD + 1)) for k in range(BARE_STEPS)}


def test_skipped_step_reports_no_stale_diagnostics(tmp_path: Path) -> None:
    """At a skipped step the logger must not show the previous step's statistics as this step's (Lightning keeps
    re-sending an on_step value that was not logged again)."""
    _, caught, rows = run_faulty(tmp_path, "32-true", {2: math.nan}, 3)
    assert caught
    by_step = {int(row["step"]): row for row in rows}
    assert by_step[2]["grokfast/skipped_steps"] == "1.0" and by_step[1]["grokfast/amplification"]
    for key in ("amplification", "slow_ratio", "cosine"):
        value = by_step[2][f"grokfast/{key}"]
        assert value == "" or math.isnan(float(value)), f"stale grokfast/{key}={value} at a skipped step"


class SkipsNonfinite(Faulty):
    """The README's remedy without a GradScaler: skip the optimizer step when a gradient is non-finite."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
            optimizer.zero_grad(set_to_none=True)


def test_readme_remedy_skips_the_optimizer_step_without_a_scaler(tmp_path: Path) -> None:
    result, caught, _ = run_faulty(tmp_path, "32-true", {2: math.nan}, 5, SkipsNonfinite)
    assert_state_equal(result.raw.params[3], result.raw.params[2])  # the bad step changed no weight
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert result.raw.of.grad_filter.skipped_steps == 1 and len(caught) == 1


# ---------------------------------------------------------------------------------------------- clipping


def test_gradient_clipping_acts_on_the_filtered_gradient_and_state_on_the_raw_one() -> None:
    """Lightning clips after ``on_before_optimizer_step``: the optimizer never sees a gradient above the clip norm
    even with a large lamb, and the filter state is built from the raw, unclipped gradients."""
    clip, steps = 0.2, 6
    used = GradRecorder(hook="on_train_batch_end")  # after optimizer.step: the gradients it used
    result = fit(GrokfastCallback(alpha=0.9, lamb=10.0), None, steps, callbacks=[used], gradient_clip_val=clip)
    reference = NaiveEMA(0.9, 10.0)
    assert len(used.steps) == steps
    for k in range(steps):
        raw, filtered, stepped = (present(r.steps[k]) for r in (result.raw, result.filtered, used))
        close(filtered, present(reference.step(raw)))
        assert norm(filtered) > clip and norm(stepped) <= clip * (1 + 1e-5)
        # clip_grad_norm_ scales by clip / (norm + 1e-6): same direction, norm = clip
        close(stepped, {n: g * clip / (norm(filtered) + 1e-6) for n, g in filtered.items()}, rtol=1e-5)
    assert any(norm(present(g)) > clip for g in result.raw.steps)  # so a state of clipped gradients would differ
    close(mus(result.raw.of.grad_filter.state_dict()), reference.mu)


# ---------------------------------------------------------------------------------------------- manual, 2 optimizers


class TinyGAN(LightningModule):
    """Manual optimization: per batch the discriminator (optimizer 1) steps twice, then the generator (optimizer
    0) once. Each optimizer's ``zero_grad`` sets only its own gradients to None, so the other one's stay."""

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
            opt_d.zero_grad()
            self.manual_backward(
                F.softplus(-self.discriminator(real)).mean() + F.softplus(self.discriminator(fake)).mean()
            )
            opt_d.step()
        opt_g.zero_grad()
        self.manual_backward(F.softplus(-self.discriminator(self.generator(z))).mean())
        opt_g.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(m.parameters(), lr=0.1) for m in (self.generator, self.discriminator)]

    def train_dataloader(self) -> DataLoader:
        real = torch.randn(32, 3, generator=torch.Generator().manual_seed(1)) * 0.5 + 1.0
        return DataLoader(TensorDataset(real), batch_size=8)


@pytest.fixture(scope="module")
def gan(tmp_path_factory: pytest.TempPathFactory) -> Any:
    logger = CSVLogger(tmp_path_factory.mktemp("gan"))
    return fit(GrokfastCallback(alpha=0.7, lamb=2.0), TinyGAN(), -1, max_epochs=1, logger=logger)


def test_manual_optimization_filters_each_optimizers_parameters_on_its_own_steps(gan: Any) -> None:
    """Every ``opt.step()`` filters that optimizer's parameters once, with their own state, and leaves the other
    optimizer's gradients (stale or fresh) and state alone."""
    raw, filtered, _, model = gan
    assert raw.optimizers == [1, 1, 0] * 4
    names = [{n for n, _ in model.named_parameters() if n.startswith(m)} for m in ("generator.", "discriminator.")]
    reference = NaiveEMA(0.7, 2.0)
    for k, opt in enumerate(raw.optimizers):
        mine, others = names[opt], names[1 - opt]
        assert set(present(raw.steps[k])) - others == mine
        close(present(filtered.steps[k], mine), reference.step(present(raw.steps[k], mine)))
        assert_state_equal(present(filtered.steps[k], others), present(raw.steps[k], others))
        keep = others & set(raw.states[k]["state"])
        assert_state_equal(*({n: s["state"][n] for n in keep} for s in (filtered.states[k], raw.states[k])))
    assert any(present(raw.steps[k], names[1]) for k, opt in enumerate(raw.optimizers) if opt == 0)
    close(mus(raw.of.grad_filter.state_dict()), reference.mu)


def test_manual_optimization_logs_per_optimizer_keys(gan: Any) -> None:
    columns, rows = read_metrics(gan.trainer.logger)
    keys = ("amplification", "slow_ratio", "cosine", "skipped_steps")
    assert {c for c in columns if c.startswith("grokfast/")} == {f"grokfast/{k}_opt{i}" for k in keys for i in (0, 1)}
    assert all(row["grokfast/amplification_opt0"] and row["grokfast/amplification_opt1"] for row in rows)


# ---------------------------------------------------------------------------------------------- unfreezing


class WithBackbone(TinyModel):
    """``backbone`` (``net.0``) is frozen, then added to the optimizer by ``BackboneFinetuning``."""

    def __init__(self) -> None:
        super().__init__(samples=24)
        self.backbone = self.net[0]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        head = [p for n, p in self.named_parameters() if not n.startswith("net.0.") and p.requires_grad]
        return torch.optim.SGD(head, lr=0.1)


def test_backbone_unfrozen_mid_training_joins_the_filter_from_its_first_gradient() -> None:
    """Unfrozen at epoch 2: no filter state before, then ``mu`` starts as an exact copy of its first gradient and
    follows the EMA."""
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=2)
    grokfast = GrokfastCallback(alpha=0.8, lamb=2.0)
    raw, filtered, trainer, model = fit(grokfast, WithBackbone(), -1, max_epochs=4, callbacks=[finetuning])
    backbone = {"net.0.weight", "net.0.bias"}
    head = {n for n, p in model.named_parameters() if n not in backbone and n != "frozen"}
    assert len(trainer.optimizers[0].param_groups) == 2  # the backbone did join
    reference, joined_at = NaiveEMA(0.8, 2.0), None
    for k, epoch in enumerate(raw.epochs):
        assert set(present(raw.steps[k])) == (head | backbone if epoch >= 2 else head)
        if epoch < 2:
            assert not backbone & set(filtered.states[k]["state"]), "frozen parameters got filter state"
        elif joined_at is None:
            joined_at = k
            assert not backbone & set(raw.states[k]["state"])
            assert_state_equal(
                {n: filtered.states[k]["state"][n]["mu"] for n in backbone}, present(raw.steps[k], backbone)
            )
        close(filtered.steps[k], reference.step(raw.steps[k]))
        close(mus(filtered.states[k]), reference.mu)
    assert joined_at is not None and joined_at > 0


# ---------------------------------------------------------------------------------------------- strategies


class SubclassedFSDP(FSDPStrategy):
    """A user's subclass of FSDP: refused as FSDP."""


class SubclassedDDP(DDPStrategy):
    """A user's subclass of DDP: supported as DDP."""


def deepspeed() -> Strategy:
    try:
        return DeepSpeedStrategy()
    except MisconfigurationException:  # not installed: an uninitialised instance of the real class serves
        return DeepSpeedStrategy.__new__(DeepSpeedStrategy)


@pytest.mark.parametrize(
    ("make_strategy", "name"),
    [(FSDPStrategy, "FSDPStrategy"), (SubclassedFSDP, "SubclassedFSDP"), (deepspeed, "DeepSpeedStrategy")],
    ids=["fsdp", "fsdp-subclass", "deepspeed"],
)
def test_sharded_strategies_are_refused_in_setup(make_strategy: Callable[[], Strategy], name: str) -> None:
    """Lightning refuses FSDP on CPU before any callback runs and DeepSpeed may be missing: ``setup`` is called
    directly, on a real Trainer whose strategy is swapped for the instance."""
    trainer = make_trainer()
    trainer._accelerator_connector.strategy = make_strategy()
    assert type(trainer.strategy).__name__ == name
    with pytest.raises(ValueError, match=f"does not support {name}") as err:
        GrokfastCallback().setup(trainer, TinyModel(), "fit")
    assert (
        "Supported: single device" in str(err.value) and "'ddp'" in str(err.value) and "'ddp_spawn'" in str(err.value)
    )


@pytest.fixture
def clean_process_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No inherited rendezvous variables; destroy the process group a single-process DDP run leaves behind."""
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.usefixtures("clean_process_group")
def test_model_parallel_strategy_is_refused_by_a_real_fit() -> None:
    grokfast = GrokfastCallback()
    with pytest.raises(ValueError, match=r"does not support ModelParallelStrategy.*Supported: single device"):
        make_trainer(callbacks=[grokfast], strategy=ModelParallelStrategy(), max_steps=2).fit(TinyModel())
    assert grokfast.grad_filter is None


@pytest.mark.usefixtures("clean_process_group")
def test_ddp_subclass_works_normally() -> None:
    """One CPU process, gloo: trains and filters as usual."""
    strategy = SubclassedDDP(process_group_backend="gloo")
    raw, filtered, trainer, _ = fit(GrokfastCallback(alpha=0.8, lamb=2.0), None, 3, strategy=strategy)
    assert trainer.strategy is strategy and trainer.global_step == 3
    reference = NaiveEMA(0.8, 2.0)
    for k in range(3):
        close(filtered.steps[k], reference.step(raw.steps[k]))
    close(mus(raw.of.grad_filter.state_dict()), reference.mu)


# ---------------------------------------------------------------------------------------------- diagnostics


def spied_fit(tmp_path: Path, grokfast: GrokfastCallback, steps: int, every: int, logger: bool = True) -> Any:
    """Fit, recording the ``compute_stats`` of every filter step; returns (run, [compute_stats], metric rows)."""
    with mock.patch.object(EMAFilter, "step", autospec=True, side_effect=EMAFilter.step) as spy:
        csv_logger = CSVLogger(tmp_path) if logger else False
        result = fit(grokfast, None, steps, logger=csv_logger, log_every_n_steps=every)
    calls = [c.kwargs.get("compute_stats", False) for c in spy.call_args_list]
    return result, calls, read_metrics(csv_logger) if logger else ([], [])


def test_diagnostics_match_the_recorded_gradients_on_logging_steps_only(tmp_path: Path) -> None:
    """amplification = |g_hat| / |g|, slow_ratio = |g_hat - g| / |g|, cosine = cos(g, g_hat - g), computed and
    logged only on the steps that reach the logger."""
    result, calls, (columns, rows) = spied_fit(tmp_path, GrokfastCallback(alpha=0.8, lamb=2.0), 9, 3)
    logging_steps = [2, 5, 8]
    assert calls == [k in logging_steps for k in range(9)]
    keys = ("amplification", "slow_ratio", "cosine", "skipped_steps")
    assert {f"grokfast/{key}" for key in keys} <= set(columns)
    logged = {int(row["step"]): row for row in rows if any(row[f"grokfast/{key}"] for key in keys)}
    assert sorted(logged) == logging_steps
    for k in logging_steps:
        row = {key: float(logged[k][f"grokfast/{key}"]) for key in keys}
        raw, filtered = present(result.raw.steps[k]), present(result.filtered.steps[k])
        slow = {n: filtered[n] - raw[n] for n in raw}
        dot = sum(float((raw[n].double() * slow[n].double()).sum()) for n in raw)
        assert row["amplification"] == pytest.approx(norm(filtered) / norm(raw), rel=1e-5)
        assert row["slow_ratio"] == pytest.approx(norm(slow) / norm(raw), rel=1e-5)
        assert row["cosine"] == pytest.approx(dot / (norm(raw) * norm(slow)), rel=1e-5)
        assert row["skipped_steps"] == 0.0


def test_no_statistics_without_a_logger(tmp_path: Path) -> None:
    """With ``logger=False`` nothing is logged, so the filter never pays for the statistics."""
    result, calls, _ = spied_fit(tmp_path, GrokfastCallback(), 6, 1, logger=False)
    assert calls == [False] * 6 and result.raw.of.grad_filter.state


def test_log_diagnostics_false_logs_only_the_skip_counter(tmp_path: Path) -> None:
    _, calls, (columns, rows) = spied_fit(tmp_path, GrokfastCallback(log_diagnostics=False), 6, 3)
    assert calls == [False] * 6
    assert {c for c in columns if c.startswith("grokfast/")} == {"grokfast/skipped_steps"}
    assert column(rows) == {2: 0.0, 5: 0.0}
