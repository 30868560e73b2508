"""The examples and benchmarks: the grokking tasks (data and models are the paper's), their CLI and shipped configs, the
report, the plain PyTorch example, the grokking sweep and the overhead benchmark. What the two tasks share (x * y mod
97, "modmul" as the sweep names it, and scikit-learn's digits) is parametrized by task; examples run in-process."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import digits
import grokking
import grokking_task
import modular_arithmetic as modmul
import overhead
import plain_pytorch
import pytest
import torch
import yaml
from helpers import assert_state_equal, mus
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn

from lightning_grokfast import GrokfastCallback, OrthoGradCallback

Capture = pytest.CaptureFixture[str]
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "configs"
EXAMPLES, THRESHOLD = {"modmul": modmul, "digits": digits}, {"modmul": 0.95, "digits": 0.9}
EVERY_CONFIG = [(t, c) for t, g in (("modmul", "*.yaml"), ("digits", "digits/*.yaml")) for c in sorted(CONFIGS.glob(g))]
PAPER = {"modmul": {"model": {"p": 97}, "data": {"p": 97, "train_fraction": 0.5}}}  # what all configs of a task keep
PAPER["digits"] = {"model": {"width": 200, "depth": 3, "init_scale": 8.0, "lr": 1e-3}, "data": {"n_train": 1000}}
QUIET, PNG = ["--trainer.enable_progress_bar", "false"], b"\x89PNG\r\n\x1a\n"
# modulus 11: 55 equations, one step an epoch and a validation after each
TINY = ["--data.p", "11", "--model.width", "16", "--model.heads", "2", "--trainer.log_every_n_steps", "1"]


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["example.py"])  # LightningCLI(args=...) warns about pytest's own sys.argv


def _assert_transforms(callbacks: list[Any], asked: list[dict[str, Any]]) -> None:  # in order, as asked
    made = [cb for cb in callbacks if isinstance(cb, (GrokfastCallback, OrthoGradCallback))]
    assert [f"lightning_grokfast.{type(cb).__name__}" for cb in made] == [a["class_path"] for a in asked]
    for cb, a in zip(made, asked):
        assert {k: getattr(cb.settings, "kind" if k == "filter" else k) for k in a["init_args"]} == a["init_args"]


def test_the_tasks_data_and_models_are_the_papers() -> None:
    inputs, targets = modmul.make_equations(97)
    assert inputs.shape == (9312, 4) and targets.shape == (9312,)
    x, op, y, eq = inputs.unbind(1)
    assert torch.equal(targets, (x * y) % 97) and int(y.min()) == 1 and int(x.min()) == 0 and int(x.max()) == 96
    assert (op == 98).all() and (eq == 97).all() and len({tuple(r) for r in inputs.tolist()}) == 9312
    model = modmul.ModularArithmeticModel(p=97)
    assert sum(p.numel() for p in model.parameters()) == 422_656 and model.model.head.bias is None
    tokens = torch.randint(0, 97, (3, 4))
    assert model(tokens).shape == (3, 99)
    changed = torch.cat([tokens[:, :3], (tokens[:, 3:] + 1) % 97], dim=1)  # causal: only the last position changes
    assert torch.allclose(model.model(changed)[:, :3], model.model(tokens)[:, :3], atol=1e-6)
    # digits: scaled, flattened images; the model an MLP initialized x8, on MSE, with AdamW
    inputs, targets = digits.load_digit_tensors()
    assert inputs.shape == (1797, 64) and inputs.dtype == torch.float32  # 0 .. 16 divided by 16: integers, rescaled
    assert float(inputs.min()) == 0.0 and float(inputs.max()) == 1.0 and torch.equal(inputs * 16, (inputs * 16).round())
    assert targets.shape == (1797,) and sorted(targets.unique().tolist()) == list(range(10))
    torch.manual_seed(0)
    plain = digits.DigitsModel(init_scale=1.0)
    torch.manual_seed(0)
    scaled = digits.DigitsModel()  # the default: the paper's x8 init
    shapes = [tuple(m.weight.shape) for m in scaled.model if isinstance(m, nn.Linear)]
    assert shapes == [(200, 64), (200, 200), (10, 200)] and sum(isinstance(m, nn.ReLU) for m in scaled.model) == 2
    assert sum(p.numel() for p in scaled.parameters()) == 55_210
    assert_state_equal(dict(scaled.named_parameters()), {n: 8 * p for n, p in plain.named_parameters()}, 1.3e-6, 1e-5)
    targets, outputs, loss = torch.tensor([3, 0, 9]), torch.randn(3, 10), digits.DigitsModel.loss
    assert float(loss(torch.zeros(3, 10), targets)) == pytest.approx(0.1)  # one 1 missed among 10 entries a row
    torch.testing.assert_close(loss(outputs, targets), ((outputs - torch.eye(10)[targets]) ** 2).mean())
    optimizer = digits.DigitsModel(weight_decay=2.0, lr=3e-3).configure_optimizers()  # no schedule, one group
    (group,) = optimizer.param_groups
    assert type(optimizer) is torch.optim.AdamW and (group["weight_decay"], group["lr"]) == (2.0, 3e-3)
    assert group["betas"] == (0.9, 0.999)


SPLITS = [(modmul.ModularArithmeticData, (4656, 4656), [512] * 9 + [48]), (digits.DigitsData, (1000, 797), [200] * 5)]


@pytest.mark.parametrize(("make", "sizes", "batches"), SPLITS, ids=["modmul", "digits"])
def test_held_out_split_by_data_seed_alone_and_batches(make: type, sizes: tuple, batches: list[int]) -> None:
    def rows(inputs: torch.Tensor, targets: torch.Tensor) -> Counter[tuple[float, ...]]:
        return Counter(map(tuple, torch.cat([inputs.float(), targets[:, None].float()], dim=1).tolist()))

    a, b, c = splits = [make(data_seed=s) for s in (0, 0, 1)]
    for data, global_seed in zip(splits, (0, 123, 0)):  # b: another global seed, the same split; c: another data_seed
        torch.manual_seed(global_seed)
        data.setup("fit")
    assert (len(a.train_set), len(a.val_set)) == (len(c.train_set), len(c.val_set)) == sizes
    assert rows(*a.train_set.tensors) + rows(*a.val_set.tensors) == rows(*a.load())  # modmul's rows are unique
    assert all(map(torch.equal, a.train_set.tensors + a.val_set.tensors, b.train_set.tensors + b.val_set.tensors))
    assert not torch.equal(a.train_set.tensors[0], c.train_set.tensors[0])
    epoch1, epoch2 = list(a.train_dataloader()), list(a.train_dataloader())
    assert [len(y) for _, y in epoch1] == batches  # the optimizer steps of an epoch: 10 (modmul) or 5 (digits)
    assert not torch.equal(epoch1[0][1], epoch2[0][1])  # reshuffled every epoch
    assert rows(*map(torch.cat, zip(*epoch1))) == rows(*a.train_set.tensors)
    (val,) = list(a.val_dataloader())
    assert all(map(torch.equal, val, a.val_set.tensors))  # in order, one batch


BAD_ARGUMENTS = [  # a class or a config, the argument, its bad value
    *[("DigitsModel", k, v) for k, v in [("init_scale", 0.0), ("init_scale", -8.0), ("weight_decay", -0.01)]],
    *[("DigitsModel", k, v) for k, v in [("lr", 0.0), ("width", 0), ("depth", 0), ("beta2", 1.0)]],
    *[("DigitsData", k, v) for k, v in [("n_train", 0), ("n_train", 1797), ("batch_size", 0)]],
    *[("ModularArithmeticData", k, v) for k, v in [("p", 1), ("train_fraction", 1.0), ("val_batch_size", 0)]],
    *[("ModularArithmeticModel", k, v) for k, v in [("warmup_steps", -1), ("lr", 0.0), ("heads", 3)]],
    *[(f"{c}.yaml", k, v) for c, k, v in [("grokfast_ema", "alpha", "abc"), ("grokfast_ema", "alpha", "1.5")]],
    *[(f"digits/{c}.yaml", k, v) for c, k, v in [("baseline", "init_scale", "-8.0"), ("grokfast_ema", "lamb", "-3")]],
]


@pytest.mark.parametrize(("where", "name", "value"), BAD_ARGUMENTS)
def test_bad_argument_is_refused_naming_it(where: str, name: str, value: Any, tmp_path: Path, capsys: Capture) -> None:
    """By the constructor, or written in a shipped config (then with the value too, on the CLI's error output)."""
    example = digits if where.startswith(("Digits", "digits/")) else modmul
    if not where.endswith(".yaml"):
        with pytest.raises(ValueError, match=rf"\b{name}\b"):  # heads: "width (128) must be divisible by heads (3)"
            getattr(example, where)(**{name: value})
        return
    text, n = re.subn(rf"(?m)^(\s*{name}:) .*$", rf"\1 {value}", (CONFIGS / where).read_text())
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises((SystemExit, ValueError)) as info:
        example.main(["--config", str(tmp_path / "bad.yaml")], run=False)
    message = str(info.value) + capsys.readouterr().err
    assert n == 1 and name in message and value in message


@pytest.mark.parametrize(("task", "config"), EVERY_CONFIG, ids=lambda v: getattr(v, "stem", v))
def test_every_config_is_as_written_and_runs(task: str, config: Path, tmp_path: Path, capsys: Capture) -> None:
    data, threshold = yaml.safe_load(text := config.read_text()), THRESHOLD[task]
    assert f"python {grokking.TASKS[task].script} fit --config {config.relative_to(REPO)}" in text  # the header
    cli = EXAMPLES[task].main(["--config", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False)
    root = f"lightning_logs/{'grokking' if task == 'modmul' else 'digits'}/{config.stem}"
    assert data["trainer"]["default_root_dir"] == root and cli.config["trainer"]["default_root_dir"] == str(tmp_path)
    assert cli.config["seed_everything"] == 0
    assert (cli.trainer.max_steps, cli.trainer.num_sanity_val_steps) == (data["trainer"]["max_steps"], 0)
    for part, made in (("model", dict(cli.model.hparams)), ("data", vars(cli.datamodule))):
        expected = {**data[part], **PAPER[task][part]}
        assert {k: made[k] for k in expected} == expected, part
    assert task == "modmul" or data["model"]["weight_decay"] == (0.01 if config.stem == "baseline" else 4.0)
    (stop,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, EarlyStopping)]
    assert (stop.monitor, stop.stopping_threshold, stop._check_on_train_epoch_end) == ("val_acc", threshold, False)
    (report,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, grokking_task.GrokkingReport)]
    assert report.threshold == data["report"]["threshold"] == threshold
    # the transforms of the sweep's method of the config's name, at the paper's settings (digits: its MNIST ones)
    asked = grokking.TASKS[task].methods.get(config.stem, [])
    assert [cb for cb in data["trainer"]["callbacks"] if cb["class_path"].startswith("lightning_grokfast.")] == asked
    _assert_transforms(cli.trainer.callbacks, asked)
    # the config as shipped, as a user's first run; an epoch is 10 steps (modmul) or 5 (digits: one validation)
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path), *QUIET]
    cli = EXAMPLES[task].main([*args, "--trainer.max_steps", "5"])
    assert cli.trainer.global_step == 5 and cli.trainer.state.status == "finished"
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("steps_to_")]
    validated = "steps_to_90: null (not reached within 5 steps; best val_acc 0."  # seed 0: about 0.14
    assert line.startswith("steps_to_95: null (no validation ran in 5 steps)" if task == "modmul" else validated)
    if not asked:  # EarlyStopping, the last callback, stops at the first validation: any accuracy is above -1
        args += ["--trainer.callbacks.stopping_threshold", "-1", "--report.threshold", "0", "--report.plot", "false"]
        cli, step = EXAMPLES[task].main([*args, *(TINY if task == "modmul" else [])]), 1 if task == "modmul" else 5
        assert f"steps_to_0: {step}" in capsys.readouterr().out.splitlines() and cli.trainer.global_step == step


def test_help_lists_both_callbacks_and_the_readmes_command_line_adds_them(capsys: Capture, tmp_path: Path) -> None:
    shown = {"--help": ["lightning_grokfast.GrokfastCallback", "lightning_grokfast.OrthoGradCallback"]}
    shown["--trainer.callbacks.help=GrokfastCallback"] = ["--trainer.callbacks.alpha", "--trainer.callbacks.fp32_state"]
    for args, names in shown.items():
        with pytest.raises(SystemExit):
            modmul.main(["fit", args], run=False)
        out = capsys.readouterr().out
        assert all(name in out for name in names), (args, names)
    args = ["--config", str(CONFIGS / "baseline.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.callbacks+=lightning_grokfast.GrokfastCallback", "--trainer.callbacks.alpha", "0.9"]
    args += ["--trainer.callbacks+=OrthoGradCallback", "--trainer.callbacks.apply_to", "matrices"]
    grokfast = {"class_path": grokking.GROKFAST, "init_args": {"filter": "ema", "alpha": 0.9, "lamb": 2.0}}
    ortho = {"class_path": grokking.ORTHOGRAD, "init_args": {"apply_to": "matrices"}}
    _assert_transforms(modmul.main(args, run=False).trainer.callbacks, [grokfast, ortho])  # lamb: the EMA's default


RUNS = [("modmul", "grokfast_ema", 24), ("digits", "grokfast_ema", 50), ("digits", "orthograd", 50)]


@pytest.mark.parametrize(("task", "method", "steps"), RUNS)
def test_a_run_reports_its_curves(task: str, method: str, steps: int, tmp_path: Path, capsys: Capture) -> None:
    # modmul: modulus 11, a validation every step, a plot; digits: validations every 5 steps, diagnostics every 50
    every, plot = (1, True) if task == "modmul" else (5, False)
    command = grokking.command(grokking.TASKS[task], method, 0.5, 0, steps, tmp_path)[2:]  # less python and script
    cli = EXAMPLES[task].main([*command, *(TINY if plot else []), "--report.plot", str(plot).lower()])
    out = capsys.readouterr().out
    assert cli.trainer.global_step == steps and cli.model.hparams.weight_decay == 0.5
    _assert_transforms(cli.trainer.callbacks, grokking.TASKS[task].methods[method])
    assert sum(isinstance(cb, EarlyStopping) for cb in cli.trainer.callbacks) == 1  # the config's, kept
    (summary,) = [Path(ln[len("summary: ") :]) for ln in out.splitlines() if ln.startswith("summary: ")]
    assert summary.name == "grokking.json" and summary.is_relative_to(tmp_path)
    record, threshold = json.loads(summary.read_text()), THRESHOLD[task]
    assert (record["threshold"], record["budget"], record["global_step"]) == (threshold, steps, steps)
    assert record["fit_s"] > 0 and record["train_curve"]["step"] == list(range(1, steps + 1))
    val, accs = record["val_curve"]["step"], record["val_curve"]["acc"]
    assert val == list(range(every, steps + 1, every))
    assert (record["final_val_acc"], record["best_val_acc"]) == (accs[-1], max(accs))
    first = next((s for s, a in zip(val, accs) if a >= threshold), None)
    result = first if first else f"null (not reached within {steps} steps; best val_acc {max(accs):.4f})"
    assert record["steps_to_threshold"] == first and f"steps_to_{threshold * 100:.0f}: {result}" in out.splitlines()
    png = summary.parent / "accuracy.png"
    assert png.exists() == (f"plot: {png}" in out) == plot and (not plot or png.read_bytes()[:8] == PNG)
    rows = list(csv.DictReader((summary.parent / "metrics.csv").read_text().splitlines()))
    diagnostic = "orthograd/radial_fraction" if method == "orthograd" else "grokfast/amplification"
    assert all(any(r.get(key) for r in rows) for key in ("val_acc", "train_acc", diagnostic))  # the callbacks logged


def test_plain_fabric_and_scaler_loops_do_the_same_arithmetic(capsys: Capture) -> None:
    filtered = plain_pytorch.train_plain(steps=60, use_filter=True)
    assert "amplification" in capsys.readouterr().out
    assert plain_pytorch.train_fabric(steps=60) == pytest.approx(filtered, rel=1e-4)
    assert plain_pytorch.train_plain(steps=60, use_filter=False) != pytest.approx(filtered, rel=1e-4)
    assert plain_pytorch.train_plain(steps=60, orthograd=True) != pytest.approx(filtered, rel=1e-4)
    # the scaler loop filters unscaled gradients: step(scaler=...) unscales exactly once, as scaler.unscale_ does
    (loss, grokfast), (manual_loss, manual) = (plain_pytorch.train_amp(steps=40, unscale_first=u) for u in (0, 1))
    assert_state_equal((loss, mus(grokfast.state_dict())), (manual_loss, mus(manual.state_dict())))
    mean_mu = torch.cat([mu.abs().flatten() for mu in mus(grokfast.state_dict()).values()]).mean()
    assert 0 < float(mean_mu) < 1.0  # the scale is 4096: a state of scaled gradients would be thousands of times larger


def test_sweep_summary_report_and_cli(tmp_path: Path) -> None:
    """The summary counts a missed run as its budget and flags the bounds; the report compares each method's best with
    the best weight decay alone; the CLI stores one file per run and resumes."""
    s = grokking.summarize([dict(seed=i, steps_to_threshold=n, budget=1000) for i, n in enumerate((300, None, 500))])
    assert (s["median"], s["min"], s["max"], s["reached"]) == (500, 300, 1000, 2)
    assert not s["median_is_bound"] and s["max_is_bound"] and s["steps"] == [300, None, 500]
    missed = grokking.summarize([{"seed": 0, "steps_to_threshold": None, "budget": 900}] * 2)
    assert missed["median_is_bound"] and missed["min_is_bound"]
    for seed, steps in enumerate([(400, 800, 200), (600, 900, 250), (500, None, 300)]):  # budget 1000
        for (method, wd), n in zip([("none", 0.001), ("none", 0.01), ("grokfast_ema", 0.01)], steps):
            (path := grokking.run_path(tmp_path, "modmul", method, wd, seed)).parent.mkdir(parents=True, exist_ok=True)
            record = {"task": "modmul", "method": method, "settings": [], "weight_decay": wd, "seed": seed}
            record |= {"threshold": 0.95, "steps_to_threshold": n, "budget": 1000, "val_curve": {"step": []}}
            path.write_text(json.dumps(record))
    text, results = grokking.report(tmp_path, make_plot=True), json.loads((tmp_path / "results.json").read_text())
    assert len(results["runs"]) == 9 and "val_curve" not in results["runs"][0]
    assert results["summary"]["modmul"]["none"]["0.01"]["median"] == 900  # a missed run counts as its budget
    assert "| grokfast_ema | 0.01 | 250 (200-300, n=3) | 2.00x |" in text  # best 500 alone against 250
    assert "(best weight decay alone: 0.001)" in text and (tmp_path / "modmul.png").read_bytes()[:8] == PNG
    assert (tmp_path / "results.md").read_text().count("| none |") == 2
    args = ["--task", "modmul", "--methods", "orthograd_ema", "--wd", "0.001", "--seeds", "3", "--budget", "20"]
    args += ["--out", str(tmp_path / "out"), "--logs", str(tmp_path / "logs"), "--no-plot"]
    assert grokking.main(args) == 0
    record = json.loads((path := grokking.run_path(tmp_path / "out", "modmul", "orthograd_ema", 0.001, 3)).read_text())
    assert (record["budget"], record["weight_decay"], record["seed"]) == (20, 0.001, 3)
    assert [cb["class_path"] for cb in record["settings"]] == [grokking.ORTHOGRAD, grokking.GROKFAST]
    assert record["steps_to_threshold"] is None and record["val_curve"]["step"][-1] == 20
    assert grokking.is_done(path, 20) and not grokking.is_done(path, 40)  # a larger budget reruns it
    mtime = path.stat().st_mtime_ns
    assert grokking.main(args) == 0 and path.stat().st_mtime_ns == mtime  # done: skipped


SHAPES = {"many-small", "transformer", "wide-mlp"}
TIMED = {"authors": 6, "floor": 2, "adamw": 5, "train": 2, "stats": 2, "bf16": 2, "orthograd": 10, "fused": 9}  # rows
COLUMNS = {"train": {"transformer, batch 64"}, "fused": {"wide-mlp"}}  # --quick: section 9 on one model only
# state bytes / parameter bytes: EMA one copy; MA the window plus the running sum (ours), the window (authors')
STATE = {"EMA (ours)": 1, "MA w10 (ours)": 11, "MA w100 (ours)": 101}
STATE |= {"EMA (authors')": 1, "MA w10 (authors')": 10, "MA w100 (authors')": 100}


def test_overhead_quick_run_reports_every_quantity(tmp_path: Path, capsys: Capture) -> None:
    returned = overhead.main(["--quick", "--json", str(tmp_path / "overhead.json")])
    text, data = capsys.readouterr().out, json.loads((tmp_path / "overhead.json").read_text())
    sections, absent = data["sections"], data["not_installed"]  # absent: the optional peers not installed
    assert data == json.loads(json.dumps(returned))
    assert data["settings"]["quick"] is True and data["machine"]["threads"] == 1
    assert "WARNING" not in text, "a transform skipped steps (inf/NaN or repeated gradients): its timings are invalid"
    assert all(row.startswith(("pytorch_optimizer", "grokfast_pytorch")) for row in absent)
    assert set(sections) == {*TIMED, "window", "memory"}
    for key, section in sections.items():
        timed, ratios = section["medians_s"], section["ratios"]
        assert f"== {section['title']} ==" in text and len(timed) == TIMED.get(key, 0) and ratios, key
        assert all(any(row in name for name in ratios) for row in timed), key  # every timed row is compared
        for name, values in [*timed.items(), *ratios.items()]:
            assert set(values) == COLUMNS.get(key, SHAPES), (key, name)
            # positive and finite; None only for (a ratio of) a peer not installed, or a compilation that never pays
            unknown = any(r in name for r in absent) or name.startswith("steps for the compilation to pay")
            assert all((v is None and unknown) or (v > 0 and math.isfinite(v)) for v in values.values()), name
    fused = {n: v["wide-mlp"] for part in ("medians_s", "ratios") for n, v in sections["fused"][part].items()}
    for kind, multi in (("EMA", "EMA (ours)"), ("MA w10", "MA w10 (ours)"), ("OrthoGrad", "OrthoGrad (ours, foreach)")):
        first, pays = fused[f"first step, {kind} (s)"], fused[f"steps for the compilation to pay, {kind}"]
        saved = fused[multi] - fused[f"{kind} (ours, fused)"]  # a step, by the fused kernel; its first step compiles
        assert first > 0 and pays == (pytest.approx(first / saved) if saved > 0 else None), (kind, first, pays)
    assert 0 < sections["train"]["ratios"]["EMA share of (training step + EMA)"]["transformer, batch 64"] < 1
    assert sections["memory"]["ratios"] == {r: {c: pytest.approx(m) for c in SHAPES} for r, m in STATE.items()}
    for fp32, what in [(f, w) for f in (True, False) for w in ("state_bytes", "expected_state_bytes")]:  # fp32: 2x
        assert sections["bf16"]["ratios"][f"{what} / param bytes, fp32_state={fp32}"] == dict.fromkeys(SHAPES, 1 + fp32)
