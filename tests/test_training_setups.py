"""The callbacks under real training setups: accumulation, inf/NaN with and without a GradScaler, clipping, manual
optimization with two optimizers, unfreezing, 16-bit training, torch.compile, DDP, StochasticWeightAveraging, long
fits.

Recorders before and after the callback (``helpers.fit``) see the raw and the transformed gradients and the state
before and after each step; they are checked against the naive references.
"""

from __future__ import annotations

import gc
import math
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    GradRecorder,
    NaiveEMA,
    SGDModel,
    TinyModel,
    assert_state_equal,
    column,
    fit,
    magnitudes,
    make_trainer,
    mus,
    naive_orthograd,
    norm,
    present,
    read_metrics,
    reference,
    replay,
)
from lightning.pytorch.callbacks import BackboneFinetuning, Callback, StochasticWeightAveraging
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_grokfast import EMAFilter, GrokfastCallback, MAFilter, OrthoGradCallback

BAD = "net.0.weight"  # the parameter whose gradient the non-finite tests overwrite with inf or NaN
close = partial(assert_state_equal, rtol=1e-6, atol=1e-7, check_dtype=False)


def differs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two EMA filter states differ at all."""
    return mus(a).keys() != mus(b).keys() or any(not torch.equal(x, mus(b)[n]) for n, x in mus(a).items())


# ---------------------------------------------------------------------------------------------- accumulation


class CountBackward(Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.count += 1


def test_accumulation_transforms_once_per_optimizer_step_on_the_accumulated_gradient() -> None:
    """4 micro-batches of 4 == one batch of 16 (Lightning divides the loss by 4): the filter runs once per optimizer
    step, its state the EMA of the accumulated gradients; ⊥Grad (not additive) once on the accumulated gradient."""
    acc, big = (fit(GrokfastCallback(alpha=0.5, lamb=2.0), TinyModel(batch_size=b, samples=96), 6,
                    accumulate_grad_batches=n) for b, n in ((4, 4), (16, 1)))  # fmt: skip
    assert acc.trainer.global_step == big.trainer.global_step == len(acc.raw.steps) == len(big.raw.steps) == 6
    close_5 = partial(assert_state_equal, rtol=1e-5, atol=1e-7)  # float32 sums in another order
    close_5(acc.raw.steps, big.raw.steps)
    close_5(dict(acc.model.named_parameters()), dict(big.model.named_parameters()))
    ema = NaiveEMA(0.5, 2.0)
    replay(ema, acc.raw.steps)
    close_5(mus(acc.raw.of.transform.state_dict()), ema.mu, check_dtype=False)
    backward = CountBackward()
    ortho = fit(OrthoGradCallback(), SGDModel(batch_size=4), 4, accumulate_grad_batches=4, callbacks=[backward])
    assert backward.count == 16 and len(ortho.filtered.steps) == 4
    for w, raw, got in zip(ortho.raw.params, ortho.raw.steps, ortho.filtered.steps):
        for n, g in present(raw).items():
            torch.testing.assert_close(got[n].double(), naive_orthograd(w[n], g), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- inf / NaN


class Faulty(TinyModel):
    """At the global steps in ``bad``, ``on_after_backward`` fills the gradient of :data:`BAD` with inf or NaN."""

    def __init__(self, bad: dict[int, float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bad = bad

    def on_after_backward(self) -> None:
        if self.trainer.global_step in self.bad:
            self.get_parameter(BAD).grad.fill_(self.bad[self.trainer.global_step])


def run_faulty(tmp_path: Path, precision: str, bad: dict[int, float], steps: int, model: Any = Faulty) -> Any:
    """Fit ``model(bad)`` with ``GrokfastCallback(alpha=0.8, lamb=2)`` and a CSV logger: (run, warnings about
    inf/NaN, logged rows)."""
    options: dict[str, Any] = {"precision": precision}
    if precision == "16-mixed":  # a small initial scale: the fp16 backward of this tiny model never overflows itself
        options = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))]}
    with warnings.catch_warnings(record=True) as caught:  # every warning, repeats included (unlike recwarn)
        warnings.simplefilter("always")
        result = fit(GrokfastCallback(alpha=0.8, lamb=2.0), model(bad), steps, logger=CSVLogger(tmp_path), **options)
    assert result.raw.global_steps == list(range(steps))
    nonfinite = [str(w.message) for w in caught if "inf or NaN" in str(w.message)]
    return result, nonfinite, read_metrics(result.trainer.logger)


def assert_skipped(result: Any, k: int) -> None:
    """At step ``k`` the state is untouched bit for bit and every gradient is passed on unchanged (still inf/NaN)."""
    assert not torch.isfinite(result.raw.steps[k][BAD]).any()
    assert_state_equal(result.raw.states[k]["state"], result.filtered.states[k]["state"])
    assert_state_equal(result.filtered.steps[k], result.raw.steps[k], equal_nan=True)


SCALED_BAD, SCALED_STEPS, BARE_BAD, BARE_STEPS = (2, 5), 9, 3, 6


@pytest.fixture(scope="module", params=[math.inf, math.nan], ids=["inf", "nan"])
def scaled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """16-mixed with a GradScaler; the gradient of BAD is inf or NaN at steps 2 and 5 of 9."""
    bad = dict.fromkeys(SCALED_BAD, request.param)
    return run_faulty(tmp_path_factory.mktemp("scaled"), "16-mixed", bad, SCALED_STEPS)


@pytest.fixture(scope="module", params=[(p, v) for p in ("32-true", "bf16-mixed") for v in (math.inf, math.nan)])
def bare(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """No GradScaler (32-true, bf16-mixed); the gradient of BAD is inf or NaN at step 3 of 6."""
    precision, value = request.param
    return run_faulty(tmp_path_factory.mktemp("bare"), precision, {BARE_BAD: value}, BARE_STEPS)


def test_with_a_scaler_bad_steps_are_skipped_by_filter_and_optimizer(scaled: Any) -> None:
    """The filter passes the inf/NaN gradients on untouched, so the scaler skips the step and halves its scale; good
    steps filter and step; the state is the EMA of the good steps; one warning, the count logged."""
    result, caught, rows = scaled
    raw, filtered = result.raw, result.filtered
    for k in range(SCALED_STEPS):
        if k in SCALED_BAD:
            assert_skipped(result, k)
            assert_state_equal(raw.params[k + 1], raw.params[k])
            assert raw.scales[k + 1] == raw.scales[k] / 2
        else:
            assert differs(raw.states[k], filtered.states[k]), f"the filter did not step at good step {k}"
            assert k + 1 == SCALED_STEPS or not torch.equal(raw.params[k + 1][BAD], raw.params[k][BAD])
    ema = NaiveEMA(0.8, 2.0)
    replay(ema, [s for k, s in enumerate(raw.steps) if k not in SCALED_BAD])
    close(mus(raw.of.transform.state_dict()), ema.mu, rtol=1e-5)
    assert raw.of.transform.skipped_steps == len(SCALED_BAD) and len(caught) == 1, caught
    skipped = {k: float(sum(b <= k for b in SCALED_BAD)) for k in range(SCALED_STEPS)}
    assert column(rows, "grokfast/skipped_steps") == skipped


def test_with_a_scaler_the_filter_sees_unscaled_gradients(scaled: Any) -> None:
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


def test_without_a_scaler_the_state_is_kept_but_the_optimizer_steps_on_the_bad_gradient(bare: Any) -> None:
    """Nothing skips ``optimizer.step()`` without a scaler: the bad parameter turns non-finite, every later gradient
    is NaN and skipped, and the state stays that of the last good step, what a resume from a checkpoint needs."""
    result, caught, rows = bare
    raw, filtered = result.raw, result.filtered
    assert all(differs(raw.states[k], filtered.states[k]) for k in range(BARE_BAD))
    assert_skipped(result, BARE_BAD)
    after = raw.params[BARE_BAD + 1]
    assert not torch.isfinite(after[BAD]).any() and all(torch.isfinite(p).all() for n, p in after.items() if n != BAD)
    assert_state_equal(raw.of.transform.state_dict()["state"], raw.states[BARE_BAD]["state"])
    assert raw.of.transform.skipped_steps == BARE_STEPS - BARE_BAD and len(caught) == 1, caught
    skipped = {k: float(max(0, k - BARE_BAD + 1)) for k in range(BARE_STEPS)}
    assert column(rows, "grokfast/skipped_steps") == skipped
    by_step = {int(row["step"]): row for row in rows}  # no stale statistics shown as those of a skipped step
    assert by_step[BARE_BAD - 1]["grokfast/amplification"]
    assert all(math.isnan(float(by_step[BARE_BAD][f"grokfast/{k}"] or "nan")) for k in ("amplification", "cosine"))


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
    assert result.raw.of.transform.skipped_steps == 1 and len(caught) == 1


class HugeLossAt(SGDModel):
    """Multiplies the loss of batch 2 by 1e30: finite float32 gradients whose squared norm overflows."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return super().training_step(batch, batch_idx) * (1e30 if batch_idx == 2 else 1.0)


@pytest.mark.parametrize("cls", [OrthoGradCallback, GrokfastCallback])
def test_an_overflowing_gradient_norm_does_not_silently_end_the_epoch(tmp_path: Path, cls: type) -> None:
    """A StopIteration escaping ``on_before_optimizer_step`` is taken by Lightning's loop for the end of the data:
    the epoch would end early without an error. Every batch of the epoch must still be trained on."""
    callback, backward = cls(), CountBackward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(callbacks=[callback, backward], max_steps=-1, max_epochs=1, logger=CSVLogger(tmp_path))
        trainer.fit(HugeLossAt(lr=1e-40))
    assert backward.count == 8 and trainer.global_step == 8, f"the epoch ended after {backward.count} of 8 batches"
    assert callback.transform.skipped_steps <= 1


# ---------------------------------------------------------------------------------------------- clipping


def test_norm_clipping_acts_on_the_filtered_gradient_and_the_state_on_the_raw_one() -> None:
    """Lightning clips after ``on_before_optimizer_step``: the optimizer never sees a gradient above the clip norm
    even with a large lamb, and the filter state is built from the raw, unclipped gradients."""
    clip, steps = 0.2, 6
    used = GradRecorder(hook="on_train_batch_end")  # after optimizer.step: the gradients it used
    result = fit(GrokfastCallback(alpha=0.9, lamb=10.0), None, steps, callbacks=[used], gradient_clip_val=clip)
    ema = NaiveEMA(0.9, 10.0)
    for k in range(steps):
        raw, filtered, stepped = (present(r.steps[k]) for r in (result.raw, result.filtered, used))
        close(filtered, present(ema.step(raw)))
        assert norm(filtered) > clip and norm(stepped) <= clip * (1 + 1e-5)
        close(stepped, {n: g * clip / (norm(filtered) + 1e-6) for n, g in filtered.items()}, rtol=1e-5)
    assert any(norm(present(g)) > clip for g in result.raw.steps)  # so a state of clipped gradients would differ
    close(mus(result.raw.of.transform.state_dict()), ema.mu)


def test_value_clipping_acts_on_the_orthogonalised_gradient() -> None:
    """The optimizer gets clamp(⊥Grad(g)), not ⊥Grad(clamp(g)) (norm clipping cannot tell the order: ⊥Grad keeps
    every tensor's norm and commutes with a scale)."""
    clip, lr = 0.02, 0.5
    result = fit(OrthoGradCallback(), SGDModel(lr=lr), 6, gradient_clip_val=clip, gradient_clip_algorithm="value")
    after = [*result.raw.params[1:], {n: p.detach() for n, p in result.model.named_parameters()}]
    far = 0.0
    for w0, w1, raw in zip(result.raw.params, after, result.raw.steps):
        for n, g in present(raw).items():
            expected = naive_orthograd(w0[n], g).clamp(-clip, clip)
            torch.testing.assert_close((w0[n].double() - w1[n].double()) / lr, expected, rtol=1e-5, atol=1e-6)
            wrong = naive_orthograd(w0[n], g.clamp(-clip, clip))
            far = max(far, float((wrong - expected).abs().max() / expected.abs().max().clamp_min(1e-12)))
    assert far > 0.1


# ---------------------------------------------------------------------------------------------- manual optimization


class TinyGAN(L.LightningModule):
    """Manual optimization: per batch the discriminator (optimizer 1) steps twice, then the generator (optimizer 0)
    once. Each optimizer's ``zero_grad`` sets only its own gradients to None, so the other one's stay."""

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
            opt_d.zero_grad()
            fake = self.generator(z).detach()
            loss = F.softplus(-self.discriminator(real)).mean() + F.softplus(self.discriminator(fake)).mean()
            self.manual_backward(loss)
            opt_d.step()
        opt_g.zero_grad()
        self.manual_backward(F.softplus(-self.discriminator(self.generator(z))).mean())
        opt_g.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(m.parameters(), lr=0.1) for m in (self.generator, self.discriminator)]

    def train_dataloader(self) -> DataLoader:
        real = torch.randn(32, 3, generator=torch.Generator().manual_seed(1)) * 0.5 + 1.0
        return DataLoader(TensorDataset(real), batch_size=8)


@pytest.mark.parametrize("cls", [GrokfastCallback, OrthoGradCallback])
def test_manual_optimization_transforms_each_optimizers_parameters_on_its_own_steps(tmp_path: Path, cls: type) -> None:
    """Every ``opt.step()`` transforms that optimizer's parameters once (EMA: with their own state) and leaves the
    other optimizer's gradients (stale or fresh) and state alone; logged keys end in ``_opt{index}``."""
    callback = cls(alpha=0.7, lamb=2.0) if cls is GrokfastCallback else cls()
    raw, filtered, _, model = fit(callback, TinyGAN(), -1, max_epochs=1, logger=CSVLogger(tmp_path))
    assert raw.optimizers == [1, 1, 0] * 4
    names = [{n for n, _ in model.named_parameters() if n.startswith(m)} for m in ("generator.", "discriminator.")]
    ema = NaiveEMA(0.7, 2.0)
    for k, opt in enumerate(raw.optimizers):
        mine, others = names[opt], names[1 - opt]
        assert set(present(raw.steps[k])) - others == mine
        assert_state_equal(present(filtered.steps[k], others), present(raw.steps[k], others))
        if cls is OrthoGradCallback:
            for n, g in present(raw.steps[k], mine).items():
                torch.testing.assert_close(filtered.steps[k][n].double(), naive_orthograd(raw.params[k][n], g),
                                           rtol=1e-5, atol=1e-7)  # fmt: skip
            continue
        close(present(filtered.steps[k], mine), ema.step(present(raw.steps[k], mine)))
        keep = others & set(raw.states[k]["state"])
        assert_state_equal(*({n: s["state"][n] for n in keep} for s in (filtered.states[k], raw.states[k])))
    assert any(present(raw.steps[k], names[1]) for k, opt in enumerate(raw.optimizers) if opt == 0)
    prefix, key = ("grokfast", "amplification") if cls is GrokfastCallback else ("orthograd", "radial_fraction")
    columns = {c for row in read_metrics(model.trainer.logger) for c, v in row.items() if c.startswith(prefix) and v}
    assert {f"{prefix}/{key}_opt0", f"{prefix}/{key}_opt1", f"{prefix}/skipped_steps_opt1"} <= columns


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
    grokfast = GrokfastCallback(alpha=0.8, lamb=2.0)
    raw, filtered, trainer, model = fit(grokfast, WithBackbone(), -1, max_epochs=4,
                                        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=2)])  # fmt: skip
    backbone = {"net.0.weight", "net.0.bias"}
    head = {n for n, p in model.named_parameters() if n not in backbone and n != "frozen"}
    assert len(trainer.optimizers[0].param_groups) == 2  # the backbone did join
    ema, joined_at = NaiveEMA(0.8, 2.0), None
    for k, epoch in enumerate(raw.epochs):
        assert set(present(raw.steps[k])) == (head | backbone if epoch >= 2 else head)
        if epoch < 2:
            assert not backbone & set(filtered.states[k]["state"]), "frozen parameters got filter state"
        elif joined_at is None:
            joined_at = k
            first = {n: filtered.states[k]["state"][n]["mu"] for n in backbone}
            assert_state_equal(first, present(raw.steps[k], backbone))
        close(filtered.steps[k], ema.step(raw.steps[k]))
        close(mus(filtered.states[k]), ema.mu)
    assert joined_at is not None and joined_at > 0


# ---------------------------------------------------------------------------------------------- precision, compile


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_16bit_training_is_the_float64_algorithm_rounded_once(precision: str, kind: str) -> None:
    """200 steps under ``bf16-true`` / ``16-true``: against the float64 reference on the same 16-bit raw gradients,
    the filtered gradient (in the gradient's dtype) is off by no more than its one final rounding (half an ulp,
    relative to the operands), thanks to the float32 state."""
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float16
    args = {"alpha": 0.98, "lamb": 2.0} if kind == "ema" else {"window_size": 20, "lamb": 5.0}
    result = fit(GrokfastCallback(filter=kind, **args), TinyModel(lr=0.001), 200, precision=precision)
    assert all(g.dtype == dtype for s in result.filtered.steps for g in present(s).values())
    expected, scale = replay(reference(kind, **args), result.raw.steps), magnitudes(kind, result.raw.steps, **args)

    def worst(filtered: list[Any]) -> float:
        return max(float((present(a)[n].double() - b).abs().max() / m[n].abs().max())
                   for a, e, m in zip(filtered, expected, scale) for n, b in present(e).items())  # fmt: skip

    tolerance = 0.5 * torch.finfo(dtype).eps * 1.02  # one rounding to the gradient's dtype, plus float32 slack
    assert worst(result.filtered.steps) <= tolerance
    # the same raw gradients through a state of the gradient's dtype (fp32_state=False) are off by more
    params = {n: nn.Parameter(torch.zeros_like(g)) for n, g in present(result.raw.steps[0]).items()}
    narrow, out = (EMAFilter if kind == "ema" else MAFilter)(params.items(), **args, fp32_state=False, fused=False), []
    for step in result.raw.steps:
        for n, p in params.items():
            p.grad = None if step[n] is None else step[n].clone()
        narrow.step()
        out.append({n: p.grad for n, p in params.items()} | {"frozen": None})
    assert worst(out) > 2 * tolerance


class CompiledTiny(TinyModel):
    """The scaffold's model with its first layer wrapped by ``torch.compile`` (names gain ``_orig_mod.``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net[0] = torch.compile(self.net[0], backend="aot_eager")  # inductor's first C++ build takes ~40 s


def test_a_compiled_submodule_filters_and_its_state_has_plain_names() -> None:
    raw, filtered, _, model = fit(GrokfastCallback(alpha=0.8, lamb=2.0), CompiledTiny(), 4)
    assert any("_orig_mod." in n for n, _ in model.named_parameters())
    for act, exp in zip(filtered.steps, replay(reference("ema", alpha=0.8, lamb=2.0), raw.steps)):
        close(present(act), present(exp), rtol=1e-5)
    names = set(raw.of.transform.state_dict()["state"])
    assert "net.0.weight" in names and not any("_orig_mod" in n for n in names)


# ---------------------------------------------------------------------------------------------- DDP, SWA, long fits


class SaveWeights(Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(pl_module.state_dict(), self.folder / f"rank{trainer.global_rank}.pt")


class RankModel(SGDModel):
    """Rank ``r`` of 2 trains on samples ``8k + 4r .. 8k + 4r + 3`` at step ``k``: together the ranks see the single
    process's batch ``8k .. 8k + 7``."""

    def train_dataloader(self) -> DataLoader:
        keep = [i for i in range(len(self.data)) if (i // 4) % 2 == self.trainer.global_rank]
        return DataLoader(Subset(self.data, keep), batch_size=4)


def test_ddp_spawn_ranks_stay_identical_and_equal_one_process(tmp_path: Path) -> None:
    """2 processes (gloo), each on half of every global batch, ⊥Grad after Grokfast: the hook sees the all-reduced
    gradient, so both ranks end bit-identical, equal to one process on the whole batch (and not to a plain run). The
    EMA and MA under DDP, with a crash and resume, are in ``test_checkpoints``."""
    callbacks = lambda: [GrokfastCallback(alpha=0.8), OrthoGradCallback()]  # noqa: E731
    trainer = make_trainer(callbacks=[*callbacks(), SaveWeights(tmp_path)], max_steps=5, devices=2,
                           strategy="ddp_spawn", use_distributed_sampler=False)  # fmt: skip
    trainer.fit(RankModel(lr=0.5))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = fit(None, SGDModel(lr=0.5), 5, callbacks=callbacks()).model.state_dict()
    plain = fit(None, SGDModel(lr=0.5), 5).model.state_dict()
    assert_state_equal(rank0, rank1)
    assert_state_equal(rank0, single, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(single[n], p, atol=1e-4) for n, p in plain.items())


class WithBatchNorm(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: Tensor, use_late: bool = True) -> Tensor:
        return super().forward(self.bn(x), use_late)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_swa_batch_norm_epoch_does_not_transform_a_gradient_twice(clip: float | None) -> None:
    """StochasticWeightAveraging adds an epoch that recomputes the BatchNorm statistics without backward and steps
    the optimizer once on the gradient the last step left, which the filter already filtered (and, with clipping,
    clipping already clipped). The filter leaves it as it is, keeps it out of its state, warns once and counts it."""
    grokfast = GrokfastCallback(alpha=0.8)
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    used = GradRecorder(hook="on_train_batch_end")
    with pytest.warns(RuntimeWarning, match=r"already transformed .*StochasticWeightAveraging"):
        raw, filtered, *_ = fit(grokfast, WithBatchNorm(), -1, max_epochs=2, gradient_clip_val=clip,
                                callbacks=[swa, used])  # fmt: skip
    assert raw.epochs[-2:] == [1, 2] and len(raw.steps) == 17  # 8 + 8 steps, then the batch-norm epoch's one
    assert grokfast.transform.repeated_steps == 1
    assert_state_equal(raw.steps[-1], used.steps[-2])  # the gradient the optimizer used last: not written since
    assert_state_equal(filtered.steps[-1], raw.steps[-1])  # left as it is
    assert_state_equal(filtered.states[-1], raw.states[-1])  # and out of the state
    assert differs(raw.states[-2], filtered.states[-2])  # while the step before filtered


class StateProbe(Callback):
    """Every 100 steps (and at step 1): the state tensor count, bytes and whether one holds a graph; every 200 steps
    the number of live tensors in the process."""

    def __init__(self, grokfast: GrokfastCallback) -> None:
        self.grokfast, self.records, self.live = grokfast, [], []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step, transform = trainer.global_step, self.grokfast.transform
        if step == 1 or step % 100 == 0:
            tensors = [v for s in transform.state.values() for v in s.values() if isinstance(v, Tensor)]
            graph = any(t.requires_grad or t.grad_fn is not None for t in tensors)
            self.records.append((step, len(tensors), transform.state_bytes(), graph))
        if step % 200 == 0:
            gc.collect()
            self.live.append(sum(issubclass(type(obj), Tensor) for obj in gc.get_objects()))


@pytest.mark.parametrize(("kind", "copies"), [("ema", 1), ("ma", 10 + 1)])
def test_state_is_flat_over_a_long_fit(tmp_path: Path, kind: str, copies: int) -> None:
    """1000 steps, diagnostics logged every 50: a constant set of graph-free state tensors, no tensors pile up."""
    grokfast, model = GrokfastCallback(filter=kind, window_size=10), TinyModel(lr=1e-3, samples=800)
    probe = StateProbe(grokfast)
    make_trainer(tmp_path, [grokfast, probe], 1000, logger=CSVLogger(tmp_path), log_every_n_steps=50).fit(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [r[0] for r in probe.records] == [1, *range(100, 1001, 100)]
    for step, count, nbytes, graph in probe.records:
        assert (count, nbytes, graph) == (len(trainable) * (1 if kind == "ema" else 2),
                                          copies * sum(4 * p.numel() for p in trainable), False), step  # fmt: skip
    assert len(probe.live) == 5 and max(probe.live) - min(probe.live) <= 2, probe.live
