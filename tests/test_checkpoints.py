"""The filter state in Lightning checkpoints: resumed bit for bit (one process, DDP, after a SIGKILL), refused when it
does not fit, and never restarted without a word.

The DDP and crash runs are ``tests/scripts/grokfast_train.py`` in subprocesses (Lightning's ``ddp`` launcher
re-executes the script it runs in, so it cannot run inside pytest).
"""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from grokfast_train import CONFIGS, EVERY, MAX_STEPS
from helpers import Run, TinyModel, assert_state_equal, fit
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_grokfast import GrokfastCallback

EPOCH = 4  # batches an epoch: checkpoints at an epoch end, so that the plain dataloader resumes exactly


def train(root: Path, grokfast: GrokfastCallback | None, steps: int, save: bool = False, **kwargs: Any) -> Run:
    """Fit ``TinyModel(hidden)`` on 4 batches an epoch; ``save``: a ``last.ckpt`` into ``root/c`` every 2 epochs."""
    saver = [ModelCheckpoint(root / "c", save_last=True, every_n_train_steps=2 * EPOCH, save_top_k=-1)] if save else []
    model = kwargs.pop("model", None) or TinyModel(hidden=kwargs.pop("hidden", 8), samples=8 * EPOCH)
    return fit(grokfast, model, steps, root=root, callbacks=saver, enable_checkpointing=save, **kwargs)


def last(root: Path) -> Path:
    return root / "c" / "last.ckpt"


def edited(path: Path, to: Path, edit: Any) -> Path:
    """A copy of the checkpoint at ``path``, changed by ``edit(checkpoint)``, saved at ``to``."""
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, to)
    return to


KEY = GrokfastCallback(alpha=0.9).state_key


@pytest.fixture(scope="module")
def ema_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of 5 steps with ``GrokfastCallback(alpha=0.9)`` (lamb 2)."""
    root = tmp_path_factory.mktemp("ema")
    train(root, GrokfastCallback(alpha=0.9), 5, save=True)
    return last(root)


CONFIGS_RESUMED = [
    {"filter": "ema", "alpha": 0.9, "lamb": 2.0},
    {"filter": "ma", "window_size": 3, "lamb": 1.5},  # the ring wraps before and after the save
    {"filter": "ma", "window_size": 16, "lamb": 1.5, "warmup": False},  # not yet full at the save
]


@pytest.mark.parametrize("config", CONFIGS_RESUMED, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_resume_is_bit_identical(tmp_path: Path, config: dict[str, Any]) -> None:
    straight = train(tmp_path / "s", GrokfastCallback(**config), 3 * EPOCH)
    first = train(tmp_path / "f", GrokfastCallback(**config), 2 * EPOCH, save=True)
    resumed = train(tmp_path / "r", GrokfastCallback(**config), 3 * EPOCH, ckpt_path=last(tmp_path / "f"))
    entry = torch.load(last(tmp_path / "f"), weights_only=True)["callbacks"][first.raw.of.state_key]
    assert entry["filter"]["kind"] == config["filter"]
    assert set(entry["filter"]["state"]) == {n for n, p in first.model.named_parameters() if p.requires_grad}
    assert resumed.trainer.global_step == straight.trainer.global_step == 3 * EPOCH
    assert_state_equal(resumed.raw.of.transform.state_dict(), straight.raw.of.transform.state_dict())
    assert_state_equal(resumed.model.state_dict(), straight.model.state_dict())


def test_resume_without_the_state_warns_and_differs(tmp_path: Path) -> None:
    """Guards the test above: a fresh filter after the resume gives other weights; and it says so."""
    straight = train(tmp_path / "s", GrokfastCallback(), 3 * EPOCH)
    train(tmp_path / "f", None, 2 * EPOCH, save=True)  # no Grokfast state saved
    with pytest.warns(UserWarning, match="holds no Grokfast state; the filter starts fresh"):
        fresh = train(tmp_path / "r", GrokfastCallback(), 3 * EPOCH, ckpt_path=last(tmp_path / "f"))
    assert fresh.raw.of.transform.state
    assert any(not torch.equal(a, b) for a, b in zip(straight.model.parameters(), fresh.model.parameters()))


def test_an_empty_entry_warns_that_the_filter_starts_fresh(tmp_path: Path, ema_ckpt: Path) -> None:
    """Lightning skips an empty callback state, so nothing else would say that the filter restarts."""
    empty = edited(ema_ckpt, tmp_path / "empty.ckpt", lambda c: c["callbacks"].update({KEY: {}}))
    with pytest.warns(UserWarning, match=r"entry .* is empty; the filter starts fresh"):
        train(tmp_path, GrokfastCallback(alpha=0.9), 8, ckpt_path=empty)


def test_a_state_without_an_entry_for_a_trained_parameter_warns_naming_it(tmp_path: Path, ema_ckpt: Path) -> None:
    """A deleted entry starts that parameter fresh: the first step after the resume names it; a frozen parameter
    (no gradient, rightly no entry) is not named."""
    cut = edited(ema_ckpt, tmp_path / "cut.ckpt", lambda c: c["callbacks"][KEY]["filter"]["state"].pop("net.2.bias"))
    with pytest.warns(RuntimeWarning, match=r"no entry for 'net\.2\.bias', which have a gradient") as record:
        run = train(tmp_path, GrokfastCallback(alpha=0.9), 8, ckpt_path=cut)
    assert not any("'frozen'" in str(w.message) for w in record)
    assert "net.2.bias" in run.raw.of.transform.state  # started fresh


def test_state_of_another_filter_or_window_is_refused(tmp_path: Path, ema_ckpt: Path) -> None:
    with pytest.raises(ValueError, match=r"does not fit.*It holds: 'ema' with \{'alpha': 0\.9, 'lamb': 2\.0\}"):
        train(tmp_path / "b", GrokfastCallback(filter="ma", window_size=3), 8, ckpt_path=ema_ckpt)
    train(tmp_path / "a", GrokfastCallback(filter="ma", window_size=3), 5, save=True)
    with pytest.raises(ValueError, match=r"does not fit.*'ma' with \{'window_size': 3"):
        train(tmp_path / "c", GrokfastCallback(filter="ma", window_size=4), 8, ckpt_path=last(tmp_path / "a"))


def test_other_shapes_unknown_names_and_nonfinite_state_are_refused(tmp_path: Path, ema_ckpt: Path) -> None:
    with pytest.raises(RuntimeError):  # Lightning refuses the model weights first...
        train(tmp_path, GrokfastCallback(alpha=0.9), 8, hidden=5, ckpt_path=ema_ckpt)
    saved = torch.load(ema_ckpt, weights_only=True)["callbacks"][KEY]
    cb = train(tmp_path / "b", GrokfastCallback(alpha=0.9), 1, hidden=5).raw.of  # ...and the filter names it
    with pytest.raises(ValueError, match=r"'late' holds 'mu' of shape \(8,\).*expects \(5,\)"):
        cb.load_state_dict(saved)
    cb = train(tmp_path / "c", GrokfastCallback(alpha=0.9), 1).raw.of
    before = copy.deepcopy(cb.transform.state_dict())
    unknown = copy.deepcopy(saved)
    unknown["filter"]["state"]["head.weight"] = {"mu": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"cannot load.*1 parameter\(s\) this transform does not have: 'head\.weight'"):
        cb.load_state_dict(unknown)
    poisoned = copy.deepcopy(saved)
    poisoned["filter"]["state"]["net.0.weight"]["mu"][0, 0] = math.nan
    with pytest.raises(ValueError, match=r"'net\.0\.weight' holds inf or NaN"):
        cb.load_state_dict(poisoned)
    assert_state_equal(cb.transform.state_dict(), before)
    nan_ckpt = edited(ema_ckpt, tmp_path / "nan.ckpt", lambda c: c["callbacks"].update({KEY: poisoned}))
    with pytest.raises(ValueError, match=r"'net\.0\.weight' holds inf or NaN"):
        train(tmp_path / "d", GrokfastCallback(alpha=0.9), 8, ckpt_path=nan_ckpt)


def test_changed_alpha_and_lamb_continue_from_the_state_with_a_warning(tmp_path: Path, ema_ckpt: Path) -> None:
    cb = GrokfastCallback(alpha=0.8, lamb=1.0)
    with pytest.warns(UserWarning, match=r"resuming filter state saved with alpha=0\.9, lamb=2\.0"):
        train(tmp_path, cb, 5, ckpt_path=ema_ckpt)  # 5 steps already done: loads, runs none
    saved = torch.load(ema_ckpt, weights_only=True)["callbacks"][cb.state_key]
    assert_state_equal(cb.transform.state_dict()["state"], saved["filter"]["state"])


def test_the_state_key_depends_only_on_the_filter_and_window() -> None:
    keys = {GrokfastCallback(alpha=0.9, lamb=0.5).state_key, GrokfastCallback(alpha=0.5, lamb=1.0).state_key}
    assert keys == {"GrokfastCallback{'filter': 'ema'}"}  # as 0.2.0 wrote it
    ma = GrokfastCallback(filter="ma", window_size=2)
    assert ma.state_key == "GrokfastCallback{'filter': 'ma', 'window_size': 2}"


def test_restored_state_follows_the_gradient_dtype(tmp_path: Path, ema_ckpt: Path) -> None:
    cb = train(tmp_path, GrokfastCallback(alpha=0.9), 6, ckpt_path=ema_ckpt, precision="64-true").raw.of
    assert {v["mu"].dtype for v in cb.transform.state.values()} == {torch.float64}


def test_evaluating_from_a_checkpoint_of_other_settings_is_not_refused(tmp_path: Path, ema_ckpt: Path) -> None:
    """``trainer.validate/test(ckpt_path=...)`` does not train: the filter's settings do not matter there."""
    from helpers import make_trainer

    trainer = make_trainer(tmp_path, [GrokfastCallback(filter="ma")], limit_val_batches=1.0)
    trainer.validate(TinyModel(hidden=8), ckpt_path=ema_ckpt)
    assert "val_loss" in trainer.callback_metrics


def test_a_checkpoint_of_version_0_1_resumes_as_one_of_today(tmp_path: Path, ema_ckpt: Path) -> None:
    """0.1.0 keyed the state by every setting; a checkpoint of it resumes when the filter and window fit."""
    old_key = "GrokfastCallback{'filter': 'ema', 'alpha': 0.9, 'lamb': 2.0}"
    old = edited(ema_ckpt, tmp_path / "old.ckpt", lambda c: c["callbacks"].update({old_key: c["callbacks"].pop(KEY)}))
    today = train(tmp_path / "a", GrokfastCallback(alpha=0.9), 8, ckpt_path=ema_ckpt)
    resumed = train(tmp_path / "b", GrokfastCallback(alpha=0.9), 8, ckpt_path=old)
    assert_state_equal(resumed.raw.of.transform.state_dict(), today.raw.of.transform.state_dict())
    assert_state_equal(resumed.model.state_dict(), today.model.state_dict())


class CompiledInPlace(TinyModel):
    """``nn.Module.compile()`` compiles the forward in place: the parameter names stay as they are."""

    def __init__(self) -> None:
        super().__init__(hidden=8, samples=8 * EPOCH)
        self.net.compile(backend="aot_eager")


def test_the_readme_way_to_compile_resumes_weights_and_state_both_ways(tmp_path: Path) -> None:
    """``torch.compile(module)`` renames the weights (``_orig_mod.``), which Lightning's strict loading refuses
    between a compiled and a plain model (the filter state alone would carry over); ``module.compile()`` keeps the
    names, so a checkpoint resumes both ways, weights and filter state."""
    straight = train(tmp_path / "s", GrokfastCallback(), 3 * EPOCH)
    for saved_by, resumed_by in ((CompiledInPlace, TinyModel), (TinyModel, CompiledInPlace)):
        root = tmp_path / saved_by.__name__
        train(root, GrokfastCallback(), 2 * EPOCH, save=True, model=saved_by() if saved_by is CompiledInPlace else None)
        model = resumed_by() if resumed_by is CompiledInPlace else None
        resumed = train(root / "r", GrokfastCallback(), 3 * EPOCH, model=model, ckpt_path=last(root))
        assert_state_equal(resumed.model.state_dict(), straight.model.state_dict(), rtol=1e-6, atol=1e-7)
        assert_state_equal(resumed.raw.of.transform.state_dict(), straight.raw.of.transform.state_dict(), rtol=1e-6,
                           atol=1e-7)  # fmt: skip


# ---------------------------------------------------------------------------------------------- DDP and crashes

SCRIPT = Path(__file__).parent / "scripts" / "grokfast_train.py"
SAVED_AT = 2 * EVERY  # the crashed runs die after step 8; their last checkpoint is the one of step 6


def launch(root: Path, devices: int, *jobs: str) -> int:
    """Run the script in a session of its own (it may SIGKILL its process group) with a clean environment."""
    drop = ("MASTER_", "SLURM_", "TORCHELASTIC_", "PL_", "RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)} | {"OMP_NUM_THREADS": "1"}
    with (root / "log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, SCRIPT, root, str(devices), *jobs], stdout=log, stderr=log, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            return proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError((root / "log").read_text()[-4000:]) from None


def runs(root: Path, devices: int, first: str, second: str) -> dict[str, Any]:
    """Full EMA and MA runs; a ``first`` run crashed, then resumed in the process that crashes a ``second`` run,
    then that one resumed. Returns, per crashed kind, the exit code, checkpoint files and last.ckpt of the crash."""
    crashes = {}
    for jobs, kind in (([f"full_{k}:{k}:full" for k in CONFIGS], first), ([f"crash_{first}:{first}:resume"], second)):
        code = launch(root, devices, *jobs, f"crash_{kind}:{kind}:crash")
        ckpt = root / f"crash_{kind}" / "ckpt"
        crashes[kind] = (code, sorted(os.listdir(ckpt)), torch.load(ckpt / "last.ckpt", weights_only=True))
    assert launch(root, devices, f"crash_{second}:{second}:resume") == 0, (root / "log").read_text()[-4000:]
    return {"root": root, "crashes": crashes}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return runs(tmp_path_factory.mktemp("single"), 1, "ema", "ma")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return runs(tmp_path_factory.mktemp("ddp"), 2, "ma", "ema")


def load(runs: dict[str, Any], job: str, what: str = "final", rank: int = 0) -> dict[str, Any]:
    return torch.load(runs["root"] / job / f"{what}_rank{rank}.pt", weights_only=True)


def trained(final: dict[str, Any]) -> dict[str, Any]:
    return {"model": final["model"], "filter": final["filter"]}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_ddp_ranks_agree_and_equal_one_process(single: dict[str, Any], ddp: dict[str, Any], kind: str) -> None:
    """Two processes fed other samples of each global batch end with identical state and weights, without a
    collective of the filter's own, equal to one process over the global batches; the checkpoint holds the state by
    parameter name (every trainable one), the live state the run ended with."""
    rank0, rank1, one = load(ddp, f"full_{kind}"), load(ddp, f"full_{kind}", rank=1), load(single, f"full_{kind}")
    assert rank0["global_step"] == rank1["global_step"] == one["global_step"] == MAX_STEPS
    for step, (s0, s1, s) in enumerate(zip(rank0["seen"], rank1["seen"], one["seen"])):
        assert not set(s0) & set(s1) and sorted(s0 + s1) == sorted(s), step  # other samples, together the batch
    assert rank0["collectives"] == rank1["collectives"] == 0
    assert_state_equal(trained(rank0), trained(rank1))
    assert_state_equal(trained(rank0), trained(one), rtol=1e-5, atol=1e-6)
    entry = torch.load(single["root"] / f"full_{kind}" / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    saved = entry[GrokfastCallback(**CONFIGS[kind]).state_key]["filter"]
    assert saved["kind"] == kind and saved["state"].keys() == set(one["model"]) - {"frozen"}
    assert_state_equal(saved, one["filter"])


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("group", ["single", "ddp"])
def test_a_crash_resumes_bit_identical(request: pytest.FixtureRequest, group: str, kind: str) -> None:
    """SIGKILLed after step 8 with the step-6 last.ckpt and none later; resumed from it, every rank restores the
    checkpoint's filter state (rank 0 wrote it) and ends bit for bit as the uninterrupted run, over its batches."""
    group_runs = request.getfixturevalue(group)
    code, files, ckpt = group_runs["crashes"][kind]
    assert code == -signal.SIGKILL and ckpt["global_step"] == SAVED_AT
    assert max(int(f.split("step=")[1].split(".")[0]) for f in files if "step=" in f) == SAVED_AT, files
    saved = ckpt["callbacks"][GrokfastCallback(**CONFIGS[kind]).state_key]["filter"]
    if kind == "ma":  # the ring has wrapped and the next write goes mid-way into it
        assert {s["count"] for s in saved["state"].values()} == {SAVED_AT} and SAVED_AT % CONFIGS["ma"]["window_size"]
    for rank in range(1 if group == "single" else 2):
        assert_state_equal(load(group_runs, f"crash_{kind}", "restored", rank), saved)
        resumed, full = load(group_runs, f"crash_{kind}", rank=rank), load(group_runs, f"full_{kind}", rank=rank)
        assert resumed["global_step"] == MAX_STEPS and resumed["seen"] == full["seen"][SAVED_AT:]
        assert_state_equal(trained(resumed), trained(load(group_runs, f"full_{kind}")))
