"""The filter state is checkpointed, restored exactly, and refused when it does not fit."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import Run, TinyModel, assert_state_equal, fit, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_grokfast import GrokfastCallback

EPOCH = 4  # batches an epoch: checkpoints at an epoch end, so that the plain dataloader resumes exactly


def train(root: Path, grokfast: GrokfastCallback | None, steps: int, save: bool = False, **kwargs: Any) -> Run:
    """Fit ``TinyModel(hidden)`` on 4 batches an epoch; ``save``: a ``last.ckpt`` into ``root/c`` every 2 epochs."""
    saver = [ModelCheckpoint(root / "c", save_last=True, every_n_train_steps=2 * EPOCH, save_top_k=-1)] if save else []
    model = TinyModel(hidden=kwargs.pop("hidden", 8), samples=8 * EPOCH)
    return fit(grokfast, model, steps, root=root, callbacks=saver, enable_checkpointing=save, **kwargs)


def last(root: Path) -> str:
    return str(root / "c" / "last.ckpt")


@pytest.fixture(scope="module")
def ema_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A checkpoint of 5 steps with ``GrokfastCallback(alpha=0.9)`` (lamb 2)."""
    root = tmp_path_factory.mktemp("ema")
    train(root, GrokfastCallback(alpha=0.9), 5, save=True)
    return last(root)


CONFIGS = [
    {"filter": "ema", "alpha": 0.9, "lamb": 2.0},
    {"filter": "ma", "window_size": 3, "lamb": 1.5},  # the ring wraps before and after the save
    {"filter": "ma", "window_size": 16, "lamb": 1.5, "warmup": False},  # not yet full at the save
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_resume_is_bit_identical(tmp_path: Path, config: dict[str, Any]) -> None:
    straight = train(tmp_path / "s", GrokfastCallback(**config), 3 * EPOCH)
    first = train(tmp_path / "f", GrokfastCallback(**config), 2 * EPOCH, save=True)
    resumed = train(tmp_path / "r", GrokfastCallback(**config), 3 * EPOCH, ckpt_path=last(tmp_path / "f"))
    entry = torch.load(last(tmp_path / "f"), weights_only=True)["callbacks"][first.raw.of.state_key]
    assert entry["config"]["filter"] == config["filter"]
    assert set(entry["filter"]["state"]) == {n for n, p in first.model.named_parameters() if p.requires_grad}
    assert resumed.trainer.global_step == straight.trainer.global_step == 3 * EPOCH
    assert_state_equal(resumed.raw.of.grad_filter.state_dict(), straight.raw.of.grad_filter.state_dict())
    assert_state_equal(resumed.model.state_dict(), straight.model.state_dict())


def test_resume_without_restoring_state_differs(tmp_path: Path) -> None:
    """Guards the test above: a fresh filter after the resume gives other weights."""
    straight = train(tmp_path / "s", GrokfastCallback(), 3 * EPOCH)
    train(tmp_path / "f", None, 2 * EPOCH, save=True)  # no Grokfast state saved
    with pytest.warns(UserWarning, match="holds no Grokfast state; the filter starts fresh"):
        fresh = train(tmp_path / "r", GrokfastCallback(), 3 * EPOCH, ckpt_path=last(tmp_path / "f"))
    assert fresh.raw.of.grad_filter.state  # it did start
    a, b = (torch.cat([p.flatten() for p in run.model.parameters()]) for run in (straight, fresh))
    assert not torch.equal(a, b)


def test_other_filter_is_refused(tmp_path: Path, ema_ckpt: str) -> None:
    with pytest.raises(ValueError, match=r"does not fit.*It holds: GrokfastCallback\(filter='ema', alpha=0\.9"):
        train(tmp_path, GrokfastCallback(filter="ma", window_size=3), 8, ckpt_path=ema_ckpt)


def test_other_window_is_refused(tmp_path: Path) -> None:
    train(tmp_path / "a", GrokfastCallback(filter="ma", window_size=3), 5, save=True)
    with pytest.raises(ValueError, match=r"does not fit.*window_size=3"):
        train(tmp_path / "b", GrokfastCallback(filter="ma", window_size=4), 8, ckpt_path=last(tmp_path / "a"))


def test_other_shapes_are_refused(tmp_path: Path, ema_ckpt: str) -> None:
    with pytest.raises(RuntimeError):  # Lightning refuses the model weights first...
        train(tmp_path, GrokfastCallback(alpha=0.9), 8, hidden=5, ckpt_path=ema_ckpt)
    cb = train(tmp_path / "b", GrokfastCallback(alpha=0.9), 1, hidden=5).raw.of  # ...and the filter names it
    with pytest.raises(ValueError, match=r"'late' holds 'mu' of shape \(8,\).*expects \(5,\)"):
        cb.load_state_dict(torch.load(ema_ckpt, weights_only=True)["callbacks"][cb.state_key])


def test_unknown_names_are_refused_and_change_nothing(tmp_path: Path, ema_ckpt: str) -> None:
    cb = train(tmp_path, GrokfastCallback(alpha=0.9), 1).raw.of
    state = torch.load(ema_ckpt, weights_only=True)["callbacks"][cb.state_key]
    state["filter"]["state"]["head.weight"] = torch.zeros(2)
    before = copy.deepcopy(cb.grad_filter.state_dict())
    with pytest.raises(ValueError, match=r"cannot load.*1 parameter\(s\) this filter does not have: 'head\.weight'"):
        cb.load_state_dict(state)
    assert_state_equal(cb.grad_filter.state_dict(), before)


def test_changed_hyperparameters_continue_with_a_warning(tmp_path: Path, ema_ckpt: str) -> None:
    cb = GrokfastCallback(alpha=0.8, lamb=1.0)
    with pytest.warns(UserWarning, match=r"resuming filter state saved with alpha=0\.9, lamb=2\.0"):
        train(tmp_path, cb, 5, ckpt_path=ema_ckpt)  # 5 steps already done: loads, runs none
    saved = torch.load(ema_ckpt, weights_only=True)["callbacks"][cb.state_key]
    assert_state_equal(cb.grad_filter.state_dict()["state"], saved["filter"]["state"])


def test_state_key_depends_only_on_the_filter_kind_and_window() -> None:
    keys = {GrokfastCallback(alpha=0.9, lamb=0.5).state_key, GrokfastCallback(alpha=0.5, lamb=1.0).state_key}
    assert len(keys) == 1
    assert GrokfastCallback(filter="ma", window_size=2).state_key not in keys
    assert GrokfastCallback(filter="ma", window_size=2).state_key != GrokfastCallback(filter="ma").state_key


def test_two_callbacks_of_one_state_key_are_refused_by_lightning() -> None:
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        make_trainer(callbacks=[GrokfastCallback(alpha=0.9), GrokfastCallback(alpha=0.5)])


def test_two_callbacks_of_other_state_keys_are_refused_in_setup(tmp_path: Path) -> None:
    ema, ma = GrokfastCallback(alpha=0.9, lamb=0.5), GrokfastCallback(filter="ma", window_size=2, lamb=0.5)
    with pytest.raises(ValueError, match="The Trainer holds 2 GrokfastCallbacks"):
        make_trainer(tmp_path, [ema, ma]).fit(TinyModel())


def test_restored_state_moves_to_the_gradient_dtype(tmp_path: Path, ema_ckpt: str) -> None:
    """Restored tensors arrive on CPU in the saved dtype; they follow the gradient at the next step."""
    cb = train(tmp_path, GrokfastCallback(alpha=0.9), 6, ckpt_path=ema_ckpt, precision="64-true").raw.of
    assert {v["mu"].dtype for v in cb.grad_filter.state.values()} == {torch.float64}


def test_evaluating_from_a_checkpoint_of_other_settings_is_not_refused(tmp_path: Path, ema_ckpt: str) -> None:
    """``trainer.validate/test(ckpt_path=...)`` does not train: the filter's settings do not matter there."""
    trainer = make_trainer(tmp_path, [GrokfastCallback(filter="ma")], limit_val_batches=1.0)
    trainer.validate(TinyModel(hidden=8), ckpt_path=ema_ckpt)
    assert "val_loss" in trainer.callback_metrics


def test_a_checkpoint_of_version_0_1_resumes_as_one_of_today(tmp_path: Path, ema_ckpt: str) -> None:
    """0.1.0 keyed the state by every setting; a checkpoint of it resumes when the filter and window fit."""
    checkpoint = torch.load(ema_ckpt, weights_only=True)
    key = GrokfastCallback(alpha=0.9).state_key
    checkpoint["callbacks"]["GrokfastCallback{'filter': 'ema', 'alpha': 0.9, 'lamb': 2.0}"] = checkpoint[
        "callbacks"
    ].pop(key)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    today = train(tmp_path / "a", GrokfastCallback(alpha=0.9), 8, ckpt_path=ema_ckpt)
    old = train(tmp_path / "b", GrokfastCallback(alpha=0.9), 8, ckpt_path=str(tmp_path / "old.ckpt"))
    assert_state_equal(old.raw.of.grad_filter.state_dict(), today.raw.of.grad_filter.state_dict())
    assert_state_equal(old.model.state_dict(), today.model.state_dict())
