"""The filter state is checkpointed, restored exactly, and refused when it does not fit."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_grokfast import GrokfastCallback

BATCHES_PER_EPOCH = 4


class Net(L.LightningModule):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8 * BATCHES_PER_EPOCH, 3, generator=g), torch.randn(8 * BATCHES_PER_EPOCH, 2))
    return DataLoader(data, batch_size=8, shuffle=False)


def fit(
    root: Path, callbacks: list[L.Callback], max_steps: int, ckpt_path: str | None = None, **trainer_kwargs: Any
) -> L.Trainer:
    torch.manual_seed(0)
    model = Net(**trainer_kwargs.pop("model_kwargs", {}))
    trainer = L.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer


def filter_state(cb: GrokfastCallback) -> dict[str, Any]:
    assert cb.grad_filter is not None
    return copy.deepcopy(cb.grad_filter.state_dict())


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


CONFIGS = [
    {"filter": "ema", "alpha": 0.9, "lamb": 2.0},
    {"filter": "ma", "window_size": 3, "lamb": 1.5},  # the ring wraps before and after the save
    {"filter": "ma", "window_size": 16, "lamb": 1.5, "warmup": False},  # not yet full at the save
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_resume_is_bit_identical(tmp_path: Path, config: dict[str, Any]) -> None:
    n, k = 3 * BATCHES_PER_EPOCH, 2 * BATCHES_PER_EPOCH  # checkpoint at an epoch end, so the data resumes exactly
    straight = GrokfastCallback(**config)
    t_straight = fit(tmp_path / "straight", [straight], n, enable_checkpointing=False)

    first = GrokfastCallback(**config)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=k, save_top_k=-1)
    fit(tmp_path / "first", [first, ckpt], k)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    entry = saved["callbacks"][first.state_key]
    assert entry["config"]["filter"] == config["filter"]
    assert set(entry["filter"]["state"]) == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"}

    resumed = GrokfastCallback(**config)
    t_resumed = fit(tmp_path / "resumed", [resumed], n, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert t_resumed.global_step == t_straight.global_step == n
    assert_same(filter_state(resumed), filter_state(straight))
    for (name, a), b in zip(t_straight.lightning_module.named_parameters(), t_resumed.lightning_module.parameters()):
        assert torch.equal(a, b), name


def test_resume_without_restoring_state_differs(tmp_path: Path) -> None:
    """Guards the test above: a fresh filter after the resume gives other weights."""
    n, k = 3 * BATCHES_PER_EPOCH, 2 * BATCHES_PER_EPOCH
    t_straight = fit(tmp_path / "s", [GrokfastCallback()], n, enable_checkpointing=False)
    fit(tmp_path / "f", [ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)], k)  # no Grokfast state saved
    fresh = GrokfastCallback()
    with pytest.warns(UserWarning, match="holds no Grokfast state; the filter starts fresh"):
        t_fresh = fit(tmp_path / "r", [fresh], n, ckpt_path=str(tmp_path / "c" / "last.ckpt"))
    assert fresh.grad_filter is not None and fresh.grad_filter.state  # it did start
    a = torch.cat([p.flatten() for p in t_straight.lightning_module.parameters()])
    b = torch.cat([p.flatten() for p in t_fresh.lightning_module.parameters()])
    assert not torch.equal(a, b)


@pytest.fixture(scope="module")
def ema_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ema_ckpt")
    fit(root, [GrokfastCallback(alpha=0.9), ModelCheckpoint(dirpath=root / "c", save_last=True)], 5)
    return root / "c" / "last.ckpt"


def test_other_filter_is_refused(tmp_path: Path, ema_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"does not fit.*It holds: filter='ema', alpha=0\.9"):
        fit(tmp_path, [GrokfastCallback(filter="ma", window_size=3)], 8, ckpt_path=str(ema_checkpoint))


def test_other_window_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "a"
    fit(root, [GrokfastCallback(filter="ma", window_size=3), ModelCheckpoint(dirpath=root / "c", save_last=True)], 5)
    with pytest.raises(ValueError, match=r"does not fit.*window_size=3"):
        fit(tmp_path / "b", [GrokfastCallback(filter="ma", window_size=4)], 8, ckpt_path=str(root / "c" / "last.ckpt"))


def test_other_shapes_are_refused(tmp_path: Path, ema_checkpoint: Path) -> None:
    with pytest.raises(RuntimeError):  # Lightning refuses the model weights first...
        fit(tmp_path, [GrokfastCallback(alpha=0.9)], 8, ckpt_path=str(ema_checkpoint), model_kwargs={"hidden": 5})
    cb = GrokfastCallback(alpha=0.9)  # ...and the filter names the mismatch on its own
    fit(tmp_path / "b", [cb], 1, model_kwargs={"hidden": 5})
    state = torch.load(ema_checkpoint, weights_only=True)["callbacks"][cb.state_key]
    with pytest.raises(ValueError, match=r"'body\.0\.weight' holds 'mu' of shape \(8, 3\).*expects \(5, 3\)"):
        cb.load_state_dict(state)


def test_unknown_names_are_refused(tmp_path: Path, ema_checkpoint: Path) -> None:
    cb = GrokfastCallback(alpha=0.9)
    fit(tmp_path, [cb], 1)
    state = torch.load(ema_checkpoint, weights_only=True)["callbacks"][cb.state_key]
    state["filter"]["state"]["head.weight"] = torch.zeros(2)
    before = filter_state(cb)
    with pytest.raises(ValueError, match=r"cannot load.*1 parameter\(s\) this filter does not have: 'head\.weight'"):
        cb.load_state_dict(state)
    assert_same(filter_state(cb), before)  # nothing changed


def test_changed_hyperparameters_continue_with_a_warning(tmp_path: Path, ema_checkpoint: Path) -> None:
    cb = GrokfastCallback(alpha=0.8, lamb=1.0)
    with pytest.warns(UserWarning, match=r"resuming filter state saved with filter='ema', alpha=0\.9"):
        fit(tmp_path, [cb], 5, ckpt_path=str(ema_checkpoint))  # 5 steps already done: loads, runs none
    saved = torch.load(ema_checkpoint, weights_only=True)["callbacks"]
    (old,) = (v for k, v in saved.items() if k.startswith("GrokfastCallback"))
    assert_same(filter_state(cb)["state"], old["filter"]["state"])


def test_two_callbacks_do_not_clash(tmp_path: Path) -> None:
    ema, ma = GrokfastCallback(alpha=0.9, lamb=0.5), GrokfastCallback(filter="ma", window_size=2, lamb=0.5)
    assert ema.state_key != ma.state_key
    fit(tmp_path / "a", [ema, ma, ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)], 6)
    ema2, ma2 = GrokfastCallback(alpha=0.9, lamb=0.5), GrokfastCallback(filter="ma", window_size=2, lamb=0.5)
    fit(tmp_path / "b", [ema2, ma2], 6, ckpt_path=str(tmp_path / "c" / "last.ckpt"))
    assert_same(filter_state(ema2), filter_state(ema))
    assert_same(filter_state(ma2), filter_state(ma))


def test_restored_state_moves_to_the_gradient_dtype(tmp_path: Path, ema_checkpoint: Path) -> None:
    """Restored tensors arrive on CPU in the saved dtype; they follow the gradient at the next step."""
    cb = GrokfastCallback(alpha=0.9)
    fit(tmp_path, [cb], 6, ckpt_path=str(ema_checkpoint), precision="64-true")
    assert cb.grad_filter is not None
    assert {v["mu"].dtype for v in cb.grad_filter.state.values()} == {torch.float64}


def test_evaluating_from_a_checkpoint_of_other_settings_is_not_refused(tmp_path: Path, ema_checkpoint: Path) -> None:
    """``trainer.validate/test(ckpt_path=...)`` does not train: the filter's settings do not matter there."""

    class Evaluated(Net):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", nn.functional.mse_loss(self.body(batch[0]), batch[1]))

    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[GrokfastCallback(filter="ma")], logger=False)
    trainer.validate(Evaluated(), loader(), ckpt_path=str(ema_checkpoint))
