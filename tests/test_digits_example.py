"""Tests of the digits example (the Grokfast paper's MNIST grokking setting on scikit-learn's digits)."""

from __future__ import annotations

import csv
import importlib
import json
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn

from lightning_grokfast import GrokfastCallback, OrthoGradCallback

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CONFIG_DIR = EXAMPLES / "configs" / "digits"
CONFIGS = [CONFIG_DIR / f"{name}.yaml" for name in ("baseline", "weight_decay", "grokfast_ema")]
SUMMARY_KEYS = {"steps_to_threshold", "threshold", "final_val_acc", "best_val_acc", "fit_s", "val_curve"}

# the callbacks exactly as the benchmark sweep appends them to the baseline config
GROKFAST_EMA = {
    "class_path": "lightning_grokfast.GrokfastCallback",
    "init_args": {"filter": "ema", "alpha": 0.8, "lamb": 0.1},
}
ORTHOGRAD = {"class_path": "lightning_grokfast.OrthoGradCallback", "init_args": {"apply_to": "all"}}


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI(args=...) warns when pytest's own command line is in sys.argv
    monkeypatch.setattr(sys, "argv", ["digits.py"])


@pytest.fixture(scope="module")
def digits() -> ModuleType:
    # `python examples/digits.py` has examples/ on sys.path, which is how it imports modular_arithmetic
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module("digits")


def _rows(x: torch.Tensor) -> Counter:
    return Counter(tuple(row.tolist()) for row in x)


def _fit_args(tmp_path: Path, max_steps: int, *callbacks: dict[str, Any]) -> list[str]:
    """The benchmark's command line (after the script name), with a small step budget."""
    args = [
        "fit", "--config", str(CONFIG_DIR / "baseline.yaml"), "--seed_everything", "0",
        "--model.weight_decay", "2.0", "--trainer.max_steps", str(max_steps),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--report.plot", "false",
    ]  # fmt: skip
    return args + [f"--trainer.callbacks+={json.dumps(cb)}" for cb in callbacks]


# ------------------------------------------------------------------------------------ data


def test_data_is_the_scaled_flattened_digits(digits: ModuleType) -> None:
    inputs, targets = digits.load_digit_tensors()
    assert inputs.shape == (1797, 64) and inputs.dtype == torch.float32
    assert float(inputs.min()) == 0.0 and float(inputs.max()) == 1.0  # 0 .. 16 divided by 16
    assert torch.equal(inputs * 16, (inputs * 16).round())  # integer pixel values, only rescaled
    assert targets.shape == (1797,) and sorted(targets.unique().tolist()) == list(range(10))


def test_split_sizes_and_it_depends_only_on_data_seed(digits: ModuleType) -> None:
    def split(data_seed: int, global_seed: int) -> Any:
        seed_everything(global_seed)
        data = digits.DigitsData(data_seed=data_seed)
        data.setup("fit")
        return data

    a = split(data_seed=0, global_seed=0)
    assert len(a.train_set) == 1000 and len(a.val_set) == 797
    # a partition of all 1,797 images (as a multiset of image-label rows)
    inputs, targets = digits.load_digit_tensors()
    everything = torch.cat([inputs, targets[:, None].float()], dim=1)
    parts = [torch.cat([s.tensors[0], s.tensors[1][:, None].float()], dim=1) for s in (a.train_set, a.val_set)]
    assert _rows(parts[0]) + _rows(parts[1]) == _rows(everything)

    b = split(data_seed=0, global_seed=123)  # another seed_everything: the same split
    assert all(torch.equal(x, y) for x, y in zip(a.train_set.tensors, b.train_set.tensors))
    assert all(torch.equal(x, y) for x, y in zip(a.val_set.tensors, b.val_set.tensors))
    c = split(data_seed=1, global_seed=0)  # another data_seed: another split
    assert not torch.equal(a.train_set.tensors[0], c.train_set.tensors[0])
    assert len(c.train_set) == 1000 and len(c.val_set) == 797


def test_loaders_shuffle_batches_of_200_and_validate_in_one_batch(digits: ModuleType) -> None:
    data = digits.DigitsData()
    data.setup("fit")
    seed_everything(0)
    epoch1 = list(data.train_dataloader())
    epoch2 = list(data.train_dataloader())
    assert [len(y) for _, y in epoch1] == [200] * 5  # 5 optimizer steps an epoch
    assert not torch.equal(epoch1[0][1], epoch2[0][1])  # reshuffled every epoch
    assert _rows(torch.cat([x for x, _ in epoch1])) == _rows(data.train_set.tensors[0])
    val = list(data.val_dataloader())
    assert len(val) == 1 and torch.equal(val[0][0], data.val_set.tensors[0])


# ------------------------------------------------------------------------------------ model


def test_mlp_shape_and_init_scaled_by_init_scale(digits: ModuleType) -> None:
    torch.manual_seed(0)
    plain = digits.DigitsModel(init_scale=1.0)
    torch.manual_seed(0)
    scaled = digits.DigitsModel()  # the default: the paper's x8 init
    linears = [m for m in scaled.model if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(200, 64), (200, 200), (10, 200)]
    assert sum(isinstance(m, nn.ReLU) for m in scaled.model) == 2
    assert sum(p.numel() for p in scaled.parameters()) == 55_210
    for (name, p1), p8 in zip(plain.named_parameters(), scaled.parameters()):
        torch.testing.assert_close(p8, 8.0 * p1, msg=name)  # every parameter, biases included
        assert float(p8.norm()) == pytest.approx(8.0 * float(p1.norm()), rel=1e-5)


def test_loss_is_mse_on_one_hot(digits: ModuleType) -> None:
    targets = torch.tensor([3, 0, 9])
    # zero outputs: one 1 among 10 entries per row is missed -> mean squared error 0.1
    assert float(digits.DigitsModel.loss(torch.zeros(3, 10), targets)) == pytest.approx(0.1)
    outputs = torch.randn(3, 10)
    expected = ((outputs - torch.eye(10)[targets]) ** 2).mean()
    torch.testing.assert_close(digits.DigitsModel.loss(outputs, targets), expected)
    # the one-hot target itself has zero loss, whatever cross-entropy would say
    assert float(digits.DigitsModel.loss(torch.eye(10)[targets], targets)) == 0.0


def test_optimizer_is_adamw_without_schedule(digits: ModuleType) -> None:
    model = digits.DigitsModel(weight_decay=2.0, lr=3e-3)
    optimizer = model.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 2.0 and group["lr"] == 3e-3 and group["betas"] == (0.9, 0.999)


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        ("DigitsModel", {"init_scale": 0.0}, "init_scale"),
        ("DigitsModel", {"init_scale": -8.0}, "init_scale"),
        ("DigitsModel", {"weight_decay": -0.01}, "weight_decay"),
        ("DigitsModel", {"lr": 0.0}, "lr"),
        ("DigitsModel", {"width": 0}, "width"),
        ("DigitsModel", {"depth": 0}, "depth"),
        ("DigitsModel", {"beta2": 1.0}, "beta2"),
        ("DigitsData", {"n_train": 0}, "n_train"),
        ("DigitsData", {"n_train": 1797}, "n_train"),
        ("DigitsData", {"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_name_the_argument(digits: ModuleType, cls: str, kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        getattr(digits, cls)(**kwargs)


def test_bad_argument_through_the_cli(digits: ModuleType, tmp_path: Path) -> None:
    args = ["--config", str(CONFIG_DIR / "baseline.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="init_scale"):
        digits.main([*args, "--model.init_scale", "0"], run=False)


# ------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize(
    ("callback", "diagnostic"),
    [(GROKFAST_EMA, "grokfast/amplification"), (ORTHOGRAD, "orthograd/radial_fraction")],
    ids=["grokfast_ema", "orthograd"],
)
def test_benchmark_command_runs_end_to_end(
    digits: ModuleType, callback: dict[str, Any], diagnostic: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # 50 steps: the config logs training metrics (the callback's diagnostics among them) every 50 steps
    cli = digits.main(_fit_args(tmp_path, 50, callback))
    out = capsys.readouterr().out

    assert cli.trainer.global_step == 50
    assert cli.model.hparams.weight_decay == 2.0
    cls = GrokfastCallback if callback is GROKFAST_EMA else OrthoGradCallback
    added = [cb for cb in cli.trainer.callbacks if isinstance(cb, cls)]
    assert len(added) == 1
    for key, value in callback["init_args"].items():
        assert getattr(added[0], key) == value, key
    assert len([cb for cb in cli.trainer.callbacks if isinstance(cb, EarlyStopping)]) == 1  # kept from the config

    summaries = [line[len("summary: ") :] for line in out.splitlines() if line.startswith("summary: ")]
    assert len(summaries) == 1
    path = Path(summaries[0])
    assert path.name == "grokking.json" and path.is_relative_to(tmp_path)
    summary = json.loads(path.read_text())
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["threshold"] == 0.9 and summary["fit_s"] > 0
    steps, accs = summary["val_curve"]["step"], summary["val_curve"]["acc"]
    assert steps == list(range(5, 51, 5))  # a validation every epoch of 5 steps
    assert summary["final_val_acc"] == accs[-1] and summary["best_val_acc"] == max(accs)
    first = next((s for s, a in zip(steps, accs) if a >= 0.9), None)
    assert summary["steps_to_threshold"] == first
    assert not (path.parent / "accuracy.png").exists()  # --report.plot false

    with (path.parent / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("val_acc") for r in rows) and any(r.get("train_acc") for r in rows)
    assert any(r.get(diagnostic) for r in rows)  # the callback ran and logged


def test_early_stopping_at_the_threshold(digits: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # a threshold the first validation surely reaches: training stops right there, after one epoch
    config = yaml.safe_load((CONFIG_DIR / "baseline.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["stopping_threshold"] = 0.0
    config["report"]["threshold"] = 0.0
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(path), "--trainer.default_root_dir", str(tmp_path)]
    cli = digits.main([*args, "--trainer.enable_progress_bar", "false", "--report.plot", "false"])
    assert "steps_to_0: 5" in capsys.readouterr().out.splitlines()
    assert cli.trainer.global_step == 5


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_instantiates(digits: ModuleType, config: Path, tmp_path: Path) -> None:
    text = config.read_text()
    assert f"python examples/digits.py fit --config examples/configs/digits/{config.name}" in text  # header
    data = yaml.safe_load(text)
    cli = digits.main(["--config", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False)
    hp = cli.model.hparams
    assert (hp.width, hp.depth, hp.init_scale, hp.lr) == (200, 3, 8.0, 1e-3)
    assert hp.weight_decay == data["model"]["weight_decay"] == (0.01 if config.stem == "baseline" else 4.0)
    assert (cli.datamodule.n_train, cli.datamodule.batch_size, cli.datamodule.data_seed) == (1000, 200, 0)
    assert cli.trainer.max_steps == 20000 and cli.trainer.num_sanity_val_steps == 0
    assert cli.config["seed_everything"] == 0
    assert cli.config["trainer"]["default_root_dir"] == str(tmp_path)
    assert data["trainer"]["default_root_dir"] == f"lightning_logs/digits/{config.stem}"
    stops = [cb for cb in cli.trainer.callbacks if isinstance(cb, EarlyStopping)]
    assert len(stops) == 1 and stops[0].monitor == "val_acc" and stops[0].stopping_threshold == 0.9
    reports = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "GrokkingReport"]
    assert len(reports) == 1 and reports[0].threshold == 0.9
    grokfast = [cb for cb in cli.trainer.callbacks if isinstance(cb, GrokfastCallback)]
    if config.stem == "grokfast_ema":
        assert len(grokfast) == 1
        assert (grokfast[0].filter, grokfast[0].alpha, grokfast[0].lamb) == ("ema", 0.8, 0.1)
    else:
        assert grokfast == []
    assert not [cb for cb in cli.trainer.callbacks if isinstance(cb, OrthoGradCallback)]
