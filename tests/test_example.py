"""The modular-arithmetic example, its configs and CLI, the plain PyTorch example and the grokking sweep."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import grokking
import modular_arithmetic as example
import plain_pytorch
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping

from lightning_grokfast import GrokfastCallback, OrthoGradCallback

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "examples" / "configs").glob("*.yaml"))
TINY = ["--data.p", "11", "--model.width", "16", "--model.heads", "2", "--trainer.enable_progress_bar", "false"]
TINY += ["--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1"]


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI(args=...) warns when pytest's own command line is in sys.argv
    monkeypatch.setattr(sys, "argv", ["modular_arithmetic.py"])


def _transforms(config: Path) -> dict[str, dict[str, Any]]:
    callbacks = yaml.safe_load(config.read_text())["trainer"].get("callbacks") or []
    return {cb["class_path"].rsplit(".", 1)[1]: cb.get("init_args", {}) for cb in callbacks}


# ------------------------------------------------------------------------------------ the task


def test_data_is_the_papers_task() -> None:
    inputs, targets = example.make_equations(97)
    assert inputs.shape == (9312, 4) and targets.shape == (9312,)
    x, op, y, eq = inputs.unbind(1)
    assert torch.equal(targets, (x * y) % 97)
    assert int(y.min()) == 1 and int(x.min()) == 0 and int(x.max()) == 96
    assert (op == 98).all() and (eq == 97).all()
    assert len({tuple(r) for r in inputs.tolist()}) == 9312


def test_split_is_half_and_depends_on_data_seed_only() -> None:
    def split(seed: int) -> tuple[set[tuple[int, ...]], set[tuple[int, ...]]]:
        dm = example.ModularArithmeticData(p=97, data_seed=seed)
        dm.setup("fit")
        return {tuple(r) for r in dm.train_set.tensors[0].tolist()}, {tuple(r) for r in dm.val_set.tensors[0].tolist()}

    train, val = split(0)
    assert len(train) == len(val) == 4656 and not train & val
    assert split(0) == (train, val)
    assert split(1)[0] != train


def test_model_size_and_causal_last_position_output() -> None:
    model = example.ModularArithmeticModel(p=97)
    assert sum(p.numel() for p in model.parameters()) == 422_656
    assert model.model.head.bias is None
    tokens = torch.randint(0, 97, (3, 4))
    assert model(tokens).shape == (3, 99)
    changed = tokens.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 97
    assert torch.allclose(model.model(changed)[:, :3], model.model(tokens)[:, :3], atol=1e-6)


# ------------------------------------------------------------------------------------ the CLI


def test_cli_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--config", str(REPO / "examples" / "configs" / "grokfast_ema.yaml"), *TINY]
    cli = example.main([*args, "--trainer.max_steps", "24", "--trainer.default_root_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert cli.trainer.global_step == 24
    log_dir = Path(cli.trainer.log_dir)
    png = log_dir / "accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {png}" in out
    summary = json.loads((log_dir / "grokking.json").read_text())
    steps, accs = summary["val_curve"]["step"], summary["val_curve"]["acc"]
    assert steps == list(range(1, 25))  # p=11: 55 equations, one step an epoch, a validation after each
    first = next((s for s, a in zip(steps, accs) if a >= 0.95), None)
    assert summary["steps_to_threshold"] == first and summary["budget"] == 24
    expected = f"steps_to_95: {first}" if first is not None else "steps_to_95: null"
    (line,) = [line for line in out.splitlines() if line.startswith("steps_to_95:")]
    assert line.startswith(expected)
    with (log_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("grokfast/amplification") for r in rows)


def test_early_stopping_reports_the_first_step_reaching_the_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load((REPO / "examples" / "configs" / "weight_decay.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["stopping_threshold"] = -1.0
    config["report"]["threshold"] = 0.0
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = example.main(["fit", "--config", str(path), *TINY, "--trainer.default_root_dir", str(tmp_path)])
    assert "steps_to_0: 1" in capsys.readouterr().out.splitlines()
    assert cli.trainer.global_step == 1


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_instantiates_as_written(config: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(config.read_text())
    cli = example.main(["--config", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.model.hparams.p == cli.datamodule.p == data["data"]["p"] == 97
    assert cli.model.hparams.weight_decay == data["model"]["weight_decay"]
    stops = [cb for cb in cli.trainer.callbacks if isinstance(cb, EarlyStopping)]
    assert len(stops) == 1 and stops[0].monitor == "val_acc" and stops[0].stopping_threshold == 0.95
    made = {
        type(cb).__name__: cb for cb in cli.trainer.callbacks if isinstance(cb, (GrokfastCallback, OrthoGradCallback))
    }
    expected = _transforms(config)
    assert set(made) == set(expected) - {"EarlyStopping"}
    for name, init_args in expected.items():
        for key, value in init_args.items() if name in made else ():
            assert getattr(made[name], key) == value, (name, key)


@pytest.mark.parametrize("value", ["abc", "1.5"])
def test_bad_grokfast_value_names_the_argument(value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (REPO / "examples" / "configs" / "grokfast_ema.yaml").read_text()
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("alpha: 0.98", f"alpha: {value}"))
    with pytest.raises((SystemExit, ValueError)) as info:
        example.main(["--config", str(path), "--trainer.default_root_dir", str(tmp_path)], run=False)
    message = str(info.value) + capsys.readouterr().err
    assert "alpha" in message and value in message


def test_fit_help_lists_both_callbacks(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        example.main(["fit", "--help"], run=False)
    out = capsys.readouterr().out
    assert "lightning_grokfast.GrokfastCallback" in out and "lightning_grokfast.OrthoGradCallback" in out


def test_callback_help_takes_the_short_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        example.main(["fit", "--trainer.callbacks.help", "GrokfastCallback"], run=False)
    out = capsys.readouterr().out
    assert "--trainer.callbacks.alpha" in out and "--trainer.callbacks.fp32_state" in out


def test_readme_command_line_form_adds_the_callback(tmp_path: Path) -> None:
    args = [
        "--config",
        str(REPO / "examples" / "configs" / "baseline.yaml"),
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    args += ["--trainer.callbacks+=lightning_grokfast.GrokfastCallback", "--trainer.callbacks.alpha", "0.9"]
    args += ["--trainer.callbacks+=OrthoGradCallback", "--trainer.callbacks.apply_to", "matrices"]
    cli = example.main(args, run=False)
    (grokfast,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, GrokfastCallback)]
    (ortho,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, OrthoGradCallback)]
    assert grokfast.alpha == 0.9 and grokfast.lamb == 2.0 and ortho.apply_to == "matrices"


# ------------------------------------------------------------------------------------ plain PyTorch


def test_plain_and_fabric_loops_do_the_same_arithmetic(capsys: pytest.CaptureFixture[str]) -> None:
    filtered = plain_pytorch.train_plain(steps=60, use_filter=True)
    assert "amplification" in capsys.readouterr().out
    assert plain_pytorch.train_fabric(steps=60) == pytest.approx(filtered, rel=1e-4)
    assert plain_pytorch.train_plain(steps=60, use_filter=False) != pytest.approx(filtered, rel=1e-4)
    assert plain_pytorch.train_plain(steps=60, orthograd=True) != pytest.approx(filtered, rel=1e-4)


def test_scaler_loop_filters_unscaled_gradients() -> None:
    loss, grokfast = plain_pytorch.train_amp(steps=40)
    manual_loss, manual = plain_pytorch.train_amp(steps=40, unscale_first=True)
    assert loss == manual_loss  # step(scaler=...) unscales exactly once, as scaler.unscale_ does
    for name, state in grokfast.state.items():
        torch.testing.assert_close(state["mu"], manual.state[name]["mu"], rtol=0, atol=0)
    # the scale is 4096: a state built from scaled gradients would be thousands of times larger
    mean_mu = torch.cat([s["mu"].abs().flatten() for s in grokfast.state.values()]).mean()
    assert 0 < float(mean_mu) < 1.0


# ------------------------------------------------------------------------------------ the sweep


def _store(out: Path, method: str, wd: float, seed: int, steps: int | None, budget: int = 1000) -> None:
    path = grokking.run_path(out, "modmul", method, wd, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"task": "modmul", "method": method, "settings": [], "weight_decay": wd, "seed": seed, "threshold": 0.95}
    record |= {"steps_to_threshold": steps, "budget": budget, "val_curve": {}}
    path.write_text(json.dumps(record))


def test_summary_counts_a_missed_run_as_its_budget_and_flags_bounds() -> None:
    runs = [
        {"seed": 0, "steps_to_threshold": 300, "budget": 1000},
        {"seed": 1, "steps_to_threshold": None, "budget": 1000},
    ]
    runs.append({"seed": 2, "steps_to_threshold": 500, "budget": 1000})
    s = grokking.summarize(runs)
    assert (s["median"], s["min"], s["max"], s["reached"]) == (500, 300, 1000, 2)
    assert not s["median_is_bound"] and s["max_is_bound"] and s["steps"] == [300, None, 500]
    missed = grokking.summarize([{"seed": 0, "steps_to_threshold": None, "budget": 900}] * 2)
    assert missed["median_is_bound"] and missed["min_is_bound"]


def test_report_compares_each_methods_best_with_the_best_weight_decay_alone(tmp_path: Path) -> None:
    for seed, (a, b, c) in enumerate([(400, 800, 200), (600, 900, 250), (500, None, 300)]):
        _store(tmp_path, "none", 0.001, seed, a)
        _store(tmp_path, "none", 0.01, seed, b)
        _store(tmp_path, "grokfast_ema", 0.01, seed, c)
    text = grokking.report(tmp_path, make_plot=True)
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["runs"]) == 9 and "val_curve" not in results["runs"][0]
    assert results["summary"]["modmul"]["none"]["0.01"]["median"] == 900  # a missed run counts as its budget
    assert "| grokfast_ema | 0.01 | 250 (200-300, n=3) | 2.00x |" in text  # best 500 alone against 250
    assert "(best weight decay alone: 0.001)" in text
    assert (tmp_path / "results.md").read_text().count("| none |") == 2
    assert (tmp_path / "modmul.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_runs_through_the_cli_stores_one_file_and_resumes(tmp_path: Path) -> None:
    args = ["--task", "modmul", "--methods", "orthograd_ema", "--wd", "0.001", "--seeds", "3", "--budget", "20"]
    args += ["--out", str(tmp_path / "out"), "--logs", str(tmp_path / "logs"), "--no-plot"]
    assert grokking.main(args) == 0
    path = grokking.run_path(tmp_path / "out", "modmul", "orthograd_ema", 0.001, 3)
    record = json.loads(path.read_text())
    assert record["budget"] == 20 and record["weight_decay"] == 0.001 and record["seed"] == 3
    assert [cb["class_path"].rsplit(".", 1)[1] for cb in record["settings"]] == [
        "OrthoGradCallback",
        "GrokfastCallback",
    ]
    assert record["steps_to_threshold"] is None and record["val_curve"]["step"][-1] == 20
    assert grokking.is_done(path, 20) and not grokking.is_done(path, 40)  # a larger budget reruns it
    mtime = path.stat().st_mtime_ns
    assert grokking.main(args) == 0 and path.stat().st_mtime_ns == mtime  # done: skipped
