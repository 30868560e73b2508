"""Tests of the modular-arithmetic example, its configs, the plain PyTorch example and the benchmark."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping

from lightning_grokfast import GrokfastCallback

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "examples" / "configs").glob("*.yaml"))
TINY = [
    "--data.p",
    "11",
    "--model.width",
    "16",
    "--model.heads",
    "2",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.log_every_n_steps",
    "1",
]


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI(args=...) warns when pytest's own command line is in sys.argv
    monkeypatch.setattr(sys, "argv", ["modular_arithmetic.py"])


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return _load("modular_arithmetic_example", REPO / "examples" / "modular_arithmetic.py")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("grokking_benchmark", REPO / "benchmarks" / "grokking.py")


def _grokfast_args(config: Path) -> dict[str, Any] | None:
    data = yaml.safe_load(config.read_text())
    for cb in data["trainer"].get("callbacks") or []:
        if cb["class_path"].endswith("GrokfastCallback"):
            return cb.get("init_args", {})
    return None


# ------------------------------------------------------------------------------------ the task


def test_data_is_the_papers_task(example: ModuleType) -> None:
    inputs, targets = example.make_equations(97)
    assert inputs.shape == (9312, 4) and targets.shape == (9312,)
    x, op, y, eq = inputs.unbind(1)
    assert torch.equal(targets, (x * y) % 97)
    assert int(y.min()) == 1 and int(x.min()) == 0 and int(x.max()) == 96
    assert (op == 98).all() and (eq == 97).all()
    assert len({tuple(r) for r in inputs.tolist()}) == 9312

    def split(seed: int) -> tuple[set[tuple[int, ...]], set[tuple[int, ...]]]:
        dm = example.ModularArithmeticData(p=97, data_seed=seed)
        dm.setup("fit")
        return {tuple(r) for r in dm.train_set.inputs.tolist()}, {tuple(r) for r in dm.val_set.inputs.tolist()}

    train, val = split(0)
    assert len(train) == len(val) == 4656 and not train & val
    assert split(0) == (train, val)  # the split depends on data_seed only
    assert split(1)[0] != train


def test_model_size_and_last_position_output(example: ModuleType) -> None:
    model = example.ModularArithmeticModel(p=97)
    assert sum(p.numel() for p in model.parameters()) == 422_656
    assert model.model.head.bias is None
    tokens = torch.randint(0, 97, (3, 4))
    assert model(tokens).shape == (3, 99)
    # causal: the answer at the last position must not change what the first positions see
    full = model.model(tokens)
    changed = tokens.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 97
    assert torch.allclose(model.model(changed)[:, :3], full[:, :3], atol=1e-6)


# ------------------------------------------------------------------------------------ (a) end to end


def test_cli_runs_end_to_end_with_grokfast(example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["fit", "--config", str(REPO / "examples" / "configs" / "grokfast_ema.yaml"), *TINY]
    args += ["--trainer.max_steps", "24", "--trainer.default_root_dir", str(tmp_path)]
    cli = example.main(args)
    out = capsys.readouterr().out

    grokfast = [cb for cb in cli.trainer.callbacks if isinstance(cb, GrokfastCallback)]
    assert len(grokfast) == 1 and grokfast[0].alpha == 0.98 and grokfast[0].lamb == 2.0
    assert cli.trainer.global_step == 24
    lines = [line for line in out.splitlines() if line.startswith("steps_to_95:")]
    assert len(lines) == 1
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir.is_relative_to(tmp_path)
    png = log_dir / "accuracy.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {png}" in out

    summary = json.loads((log_dir / "grokking.json").read_text())
    steps, accs = summary["val_curve"]["step"], summary["val_curve"]["acc"]
    # p=11: 55 training equations, one step an epoch, a validation after every step
    assert steps == list(range(1, 25))
    first = next((s for s, a in zip(steps, accs) if a >= 0.95), None)
    assert summary["steps_to_95"] == first
    assert lines[0] == f"steps_to_95: {first}" if first is not None else lines[0].startswith("steps_to_95: null")
    assert summary["budget"] == 24

    with (log_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("grokfast/amplification") for r in rows)  # the callback ran and logged
    assert any(r.get("val_acc") for r in rows) and any(r.get("train_acc") for r in rows)


def test_early_stopping_reports_the_first_step_reaching_the_threshold(
    example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # a threshold the first validation surely reaches: training stops right there
    config = yaml.safe_load((REPO / "examples" / "configs" / "weight_decay.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["stopping_threshold"] = -1.0
    config["report"]["threshold"] = 0.0
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = example.main(["fit", "--config", str(path), *TINY, "--trainer.default_root_dir", str(tmp_path)])
    assert "steps_to_0: 1" in capsys.readouterr().out.splitlines()
    assert cli.trainer.global_step == 1


# ------------------------------------------------------------------------------------ (b) configs


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_instantiates(example: ModuleType, config: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(config.read_text())
    cli = example.main(["--config", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.model.hparams.p == cli.datamodule.p == data["data"]["p"] == 97
    assert cli.model.hparams.weight_decay == data["model"]["weight_decay"]
    assert cli.trainer.max_steps == data["trainer"]["max_steps"]
    stops = [cb for cb in cli.trainer.callbacks if isinstance(cb, EarlyStopping)]
    assert len(stops) == 1 and stops[0].monitor == "val_acc" and stops[0].stopping_threshold == 0.95
    grokfast = [cb for cb in cli.trainer.callbacks if isinstance(cb, GrokfastCallback)]
    expected = _grokfast_args(config)
    if expected is None:
        assert grokfast == []
    else:
        assert len(grokfast) == 1
        for key, value in expected.items():
            assert getattr(grokfast[0], key) == value, key
    assert sum(p.numel() for p in cli.model.parameters()) == 422_656


# ------------------------------------------------------------------------------------ (c) bad values


@pytest.mark.parametrize("value", ["abc", "1.5"])
def test_bad_grokfast_value_names_the_argument(
    example: ModuleType, value: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    text = (REPO / "examples" / "configs" / "grokfast_ema.yaml").read_text()
    assert "alpha: 0.98" in text
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("alpha: 0.98", f"alpha: {value}"))
    with pytest.raises((SystemExit, ValueError)) as info:
        example.main(["--config", str(path), "--trainer.default_root_dir", str(tmp_path)], run=False)
    message = str(info.value) + capsys.readouterr().err
    assert "alpha" in message and value in message


# ------------------------------------------------------------------------------------ (d) plain PyTorch


def test_plain_pytorch_example_runs(capsys: pytest.CaptureFixture) -> None:
    plain = _load("plain_pytorch_example", REPO / "examples" / "plain_pytorch.py")
    filtered = plain.train_plain(steps=60, use_filter=True)
    out = capsys.readouterr().out
    assert "amplification" in out and "final loss" in out
    # the Fabric loop does the same arithmetic as the plain loop
    assert plain.train_fabric(steps=60) == pytest.approx(filtered, rel=1e-4)
    assert plain.train_plain(steps=60, use_filter=False) != pytest.approx(filtered, rel=1e-4)


# ------------------------------------------------------------------------------------ (e) benchmark


def _run(name: str, seed: int, steps: int | None, budget: int = 1000) -> dict[str, Any]:
    return {
        "name": name,
        "seed": seed,
        "steps_to_95": steps,
        "wall_s": 1.0,
        "final_val_acc": 0.96 if steps else 0.5,
        "budget": budget,
        "val_curve": {"step": [10, 20], "acc": [0.1, 0.96 if steps else 0.5]},
    }


def test_benchmark_report_only_aggregates(bench: ModuleType, tmp_path: Path) -> None:
    runs = [
        _run("baseline", 0, None, budget=1000),  # not reached: every speed-up against it is a lower bound
        _run("weight_decay", 0, 300),
        _run("weight_decay", 1, 500),
        _run("weight_decay", 2, 400),
        _run("grokfast_ema", 0, 100),
        _run("grokfast_ema", 1, 200),
        _run("grokfast_ema", 2, None, budget=1000),
        _run("grokfast_ma", 0, None, budget=600),
    ]
    (tmp_path / "runs").mkdir()
    for r in runs:
        (tmp_path / "runs" / f"{r['name']}-seed{r['seed']}.json").write_text(json.dumps(r))
    assert bench.main(["--out", str(tmp_path), "--report-only"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "val_acc.png").exists()
    assert len(results["runs"]) == 8 and results["runs"][0]["name"] == "baseline"

    s = results["summary"]
    assert list(s) == ["baseline", "weight_decay", "grokfast_ema", "grokfast_ma"]
    assert s["weight_decay"]["median_steps_to_95"] == 400 and not s["weight_decay"]["median_lower_bound"]
    assert (s["weight_decay"]["min"], s["weight_decay"]["max"]) == (300, 500)
    assert s["grokfast_ema"]["median_steps_to_95"] == 200 and not s["grokfast_ema"]["median_lower_bound"]
    assert s["grokfast_ema"]["max"] == 1000 and s["grokfast_ema"]["max_lower_bound"]
    assert (s["grokfast_ema"]["n_seeds"], s["grokfast_ema"]["n_reached"]) == (3, 2)
    assert s["baseline"]["median_steps_to_95"] == 1000 and s["baseline"]["median_lower_bound"]

    sp = results["speedup"]
    assert sp["grokfast_ema"]["vs_baseline"] == pytest.approx(5.0)  # >= 1000 / 200
    assert sp["grokfast_ema"]["bounds"]["vs_baseline"] == "lower" and sp["grokfast_ema"]["lower_bound"]
    assert sp["grokfast_ema"]["vs_weight_decay"] == pytest.approx(2.0)
    assert sp["grokfast_ema"]["bounds"]["vs_weight_decay"] == "exact"
    assert sp["weight_decay"]["vs_baseline"] == pytest.approx(2.5) and sp["weight_decay"]["lower_bound"]
    assert sp["baseline"]["vs_baseline"] == 1.0 and sp["baseline"]["bounds"]["vs_baseline"] == "exact"
    assert sp["baseline"]["bounds"]["vs_weight_decay"] == "upper"
    # the target did not reach 95%: an upper bound; neither reached: unknown
    assert sp["grokfast_ma"]["vs_weight_decay"] == pytest.approx(400 / 600)
    assert sp["grokfast_ma"]["bounds"]["vs_weight_decay"] == "upper" and sp["grokfast_ma"]["upper_bound"]
    assert sp["grokfast_ma"]["vs_baseline"] is None and sp["grokfast_ma"]["bounds"]["vs_baseline"] == "unknown"


def test_benchmark_tiny_real_run_is_stored_and_resumed(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["--out", str(tmp_path), "--no-plot", "--configs", "grokfast_ma", "--budget", "6"]
    args += ["--override", "data.p=11", "--override", "model.width=16"]
    assert bench.main(args) == 0  # runs the example CLI in a subprocess
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "runs" / "grokfast_ma-seed0.json").read_text())
    assert record["budget"] == 6 and record["global_step"] == 6
    assert record["val_curve"]["step"] == [1, 2, 3, 4, 5, 6]
    assert "--data.p" in record["command"] and "grokfast_ma.yaml" in " ".join(record["command"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["grokfast_ma"]
    assert "| grokfast_ma | 1 (" in out
    assert bench.main(args) == 0  # resumable: the stored run is not repeated
    again = capsys.readouterr().out
    assert "already in" in again and "[start]" not in again


def test_benchmark_imports_a_cli_run_from_its_metrics_csv(bench: ModuleType, tmp_path: Path) -> None:
    # a run made directly with the example CLI whose grokking.json is missing (e.g. it was killed)
    log_dir = tmp_path / "csv" / "version_0"
    log_dir.mkdir(parents=True)
    rows = ["epoch,step,train_acc,train_loss,val_acc,val_loss", "0,9,0.5,1.0,,", "0,9,,,0.50,2.0"]
    rows += ["1,19,1.0,0.1,,", "1,19,,,0.96,0.2", "2,29,,,0.97,0.1"]
    (log_dir / "metrics.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "bench"
    assert bench.main(["--out", str(out), "--no-plot", "--import-run", "baseline", "0", str(log_dir)]) == 0
    record = json.loads((out / "runs" / "baseline-seed0.json").read_text())
    # Lightning logs the end-of-epoch validation under global_step - 1
    assert record["steps_to_95"] == 20 and record["val_curve"]["step"] == [10, 20, 30]
    assert record["budget"] == 100000  # from examples/configs/baseline.yaml
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["baseline"]["median_steps_to_95"] == 20
