"""DDP, crash-and-resume and long-run behaviour of the Grokfast filters and callback.

* DDP on CPU (gloo, two processes, each rank on other samples): the filter works on the all-reduced
  gradient, so both ranks hold the same state without any communication of their own, and the run equals a
  single process over the union of the ranks' batches.
* A run SIGKILLed mid-way and resumed with ``ckpt_path="last"`` (single process and DDP) ends bit for bit
  where an uninterrupted run ends: weights, optimizer-driven trajectory and filter state (MA ring position
  included).
* Thousands of steps do not grow the filter state, keep no autograd graph and do not grow the process memory.
* The checkpoint loads with ``weights_only=True`` and holds the state by parameter name under ``state_key``.

The training runs of the first two groups happen in subprocesses (``tests/scripts/grokfast_train.py``); a few
module-scoped fixtures run each process once and the tests read the files they leave.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_grokfast import EMAFilter, GradientFilter, GrokfastCallback, MAFilter

SCRIPT = Path(__file__).parent / "scripts" / "grokfast_train.py"
KINDS = ("ema", "ma")
MAX_STEPS = 12
EVERY = 3  # checkpoint every 3 steps = one epoch
HANG_AT = 8  # the crashed run dies after step 8: its last checkpoint is the one of step 6
RUN_TIMEOUT = 240.0


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grokfast_train", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = _load_script()
FILTER_CONFIGS: dict[str, dict[str, Any]] = TRAIN.FILTER_CONFIGS
MA_WINDOW: int = FILTER_CONFIGS["ma"]["window_size"]


# ---------------------------------------------------------------------------------------------- subprocesses
def _env() -> dict[str, str]:
    """The environment of a training subprocess: no inherited cluster or rendezvous settings."""
    dropped = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in dropped and not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_", "LT_"))
    }
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _command(root: Path, devices: int, jobs: list[str]) -> list[str]:
    cmd = [sys.executable, str(SCRIPT), str(root), "--devices", str(devices), "--max-steps", str(MAX_STEPS)]
    cmd += ["--every", str(EVERY), "--hang-at-step", str(HANG_AT)]
    for job in jobs:
        cmd += ["--job", job]
    return cmd


def _tail(log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return text[-4000:]


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (a zombie, dead but not yet reaped, does not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of ``proc`` (the launcher and, under DDP, the rank it started); wait for all."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _group_alive(proc.pid):
        assert time.monotonic() < deadline, "processes of the killed group are still running"
        time.sleep(0.05)


def _run(root: Path, devices: int, jobs: list[str], log_name: str) -> None:
    """Run the script to its end."""
    log = root / f"{log_name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            _command(root, devices, jobs), stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
        )
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise AssertionError(f"training timed out:\n{_tail(log)}") from None
    assert rc == 0, f"training failed with exit code {rc}:\n{_tail(log)}"


@dataclass
class Crash:
    """What a SIGKILLed run left behind, recorded before the resume adds checkpoints."""

    returncode: int
    checkpoints: list[str]  # the checkpoint files at the time of the kill
    last: dict[str, Any]  # last.ckpt at the time of the kill


def _run_until_hung(root: Path, devices: int, jobs: list[str], log_name: str) -> Crash:
    """Run the script until every rank of its last job (a ``hang`` job) hangs, then SIGKILL its process group."""
    hung_dir = root / jobs[-1].split(":")[0]
    markers = [hung_dir / f"hung_rank{r}" for r in range(devices)]
    log = root / f"{log_name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            _command(root, devices, jobs), stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
        )
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while not all(m.exists() for m in markers):
                if proc.poll() is not None:
                    raise AssertionError(f"training exited ({proc.returncode}) before hanging:\n{_tail(log)}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"training did not reach step {HANG_AT} in time:\n{_tail(log)}")
                time.sleep(0.05)
        finally:
            _kill_group(proc)
    ckpt_dir = hung_dir / "ckpt"
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    return Crash(proc.returncode, sorted(p.name for p in ckpt_dir.iterdir()), last)


def _final(root: Path, job: str, rank: int = 0) -> dict[str, Any]:
    return torch.load(root / job / f"final_rank{rank}.pt", map_location="cpu", weights_only=True)


def _restored(root: Path, job: str, rank: int = 0) -> dict[str, Any]:
    return torch.load(root / job / f"restored_rank{rank}.pt", map_location="cpu", weights_only=True)


@dataclass
class Runs:
    """The output folder of a group of runs, and the crashes by job folder."""

    root: Path
    crashes: dict[str, Crash]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Single process: uninterrupted EMA and MA runs; an EMA and an MA run killed after step 8, then resumed."""
    root = tmp_path_factory.mktemp("single")
    first = ["full_ema:ema:full", "full_ma:ma:full", "crash_ema:ema:hang"]
    crashes = {"crash_ema": _run_until_hung(root, 1, first, "a")}
    crashes["crash_ma"] = _run_until_hung(root, 1, ["crash_ema:ema:resume", "crash_ma:ma:hang"], "b")
    _run(root, 1, ["crash_ma:ma:resume"], "c")
    return Runs(root, crashes)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Two-process DDP: uninterrupted EMA and MA runs; an MA and an EMA run killed after step 8, then resumed."""
    root = tmp_path_factory.mktemp("ddp")
    first = ["full_ema:ema:full", "full_ma:ma:full", "crash_ma:ma:hang"]
    crashes = {"crash_ma": _run_until_hung(root, 2, first, "a")}
    crashes["crash_ema"] = _run_until_hung(root, 2, ["crash_ma:ma:resume", "crash_ema:ema:hang"], "b")
    _run(root, 2, ["crash_ema:ema:resume"], "c")
    return Runs(root, crashes)


# ---------------------------------------------------------------------------------------------- comparisons
def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _flatten(f"{prefix}/{key}", value[key])
    else:
        yield prefix, value


def _assert_same(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    """``a`` and ``b`` hold the same keys and equal values; tensors bit for bit (``torch.equal``)."""
    flat_a, flat_b = dict(_flatten("", a)), dict(_flatten("", b))
    assert flat_a.keys() == flat_b.keys(), f"{what}: keys differ: {sorted(flat_a.keys() ^ flat_b.keys())[:6]}"
    for key, x in flat_a.items():
        y = flat_b[key]
        if isinstance(x, Tensor):
            assert isinstance(y, Tensor) and x.dtype == y.dtype and x.shape == y.shape, f"{what}{key}"
            diff = (x.double() - y.double()).abs().max().item()
            assert torch.equal(x, y), f"{what}{key} differs (max abs diff {diff:.3g})"
        else:
            assert x == y, f"{what}{key}: {x!r} != {y!r}"


def _assert_close(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    """``a`` and ``b`` hold the same keys; tensors equal within float32 rounding, other values exactly."""
    flat_a, flat_b = dict(_flatten("", a)), dict(_flatten("", b))
    assert flat_a.keys() == flat_b.keys(), f"{what}: keys differ: {sorted(flat_a.keys() ^ flat_b.keys())[:6]}"
    for key, x in flat_a.items():
        y = flat_b[key]
        if isinstance(x, Tensor):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{what}{k}: {m}")
        else:
            assert x == y, f"{what}{key}: {x!r} != {y!r}"


def _trained(final: dict[str, Any]) -> dict[str, Any]:
    """What must match between two runs: the weights and the whole filter state."""
    return {"model": final["model"], "filter": final["filter"]}


def _ckpt_filter_state(ckpt: dict[str, Any], kind: str) -> dict[str, Any]:
    key = GrokfastCallback(**FILTER_CONFIGS[kind]).state_key
    return ckpt["callbacks"][key]["filter"]


# ---------------------------------------------------------------------------------------------- 1. DDP
@pytest.mark.parametrize("kind", KINDS)
def test_ddp_ranks_agree_and_equal_single_process(single: Runs, ddp: Runs, kind: str) -> None:
    """DDP filters the all-reduced gradient: same state on both ranks, no own communication, = one process."""
    rank0, rank1 = _final(ddp.root, f"full_{kind}", 0), _final(ddp.root, f"full_{kind}", 1)
    one = _final(single.root, f"full_{kind}")
    assert rank0["global_step"] == rank1["global_step"] == one["global_step"] == MAX_STEPS

    # The ranks trained on different samples, and together on the single process's batches.
    assert len(rank0["seen"]) == len(rank1["seen"]) == len(one["seen"]) == MAX_STEPS
    for step, (s0, s1, s) in enumerate(zip(rank0["seen"], rank1["seen"], one["seen"])):
        assert not set(s0) & set(s1), f"step {step}: the ranks share samples"
        assert sorted(s0 + s1) == sorted(s), f"step {step}: the ranks' union is not the single-process batch"

    # The hook made no communication of its own, and yet both ranks hold the same filter state and weights:
    # it filtered the all-reduced gradient, which is the same on every rank.
    assert rank0["collectives"] == rank1["collectives"] == 0
    _assert_same(_trained(rank0), _trained(rank1), f"{kind}: rank 0 vs rank 1 ")
    names = set(rank0["model"])
    assert set(rank0["filter"]["state"]) == names
    if kind == "ma":
        assert all(s["count"] == MAX_STEPS for s in rank0["filter"]["state"].values())

    # ... and that gradient is the mean over the global batch: DDP equals one process over both batches.
    _assert_close(_trained(rank0), _trained(one), f"{kind}: DDP vs single process ")


# ---------------------------------------------------------------------------------------------- 2./3. resume
def _check_crash(crash: Crash, kind: str) -> None:
    """The run died by SIGKILL after step 8, with the step-6 checkpoint as last.ckpt and no later one."""
    assert crash.returncode == -signal.SIGKILL
    assert crash.last["global_step"] == 2 * EVERY
    steps = sorted(int(name.split("step=")[1].split(".")[0]) for name in crash.checkpoints if "step=" in name)
    assert steps and max(steps) == 2 * EVERY, crash.checkpoints
    if kind == "ma":  # the ring has wrapped and the next write goes mid-way into it
        counts = {s["count"] for s in _ckpt_filter_state(crash.last, kind)["state"].values()}
        assert counts == {2 * EVERY}
        assert 2 * EVERY > MA_WINDOW and (2 * EVERY) % MA_WINDOW != 0


@pytest.mark.parametrize("kind", KINDS)
def test_single_process_crash_resumes_bit_identical(single: Runs, kind: str) -> None:
    """A run SIGKILLed after step 8 and resumed from the step-6 last.ckpt ends bit for bit as an unbroken one."""
    job = f"crash_{kind}"
    crash = single.crashes[job]
    _check_crash(crash, kind)

    # The resumed run started from the checkpoint's filter state, not from a fresh filter ...
    _assert_same(_restored(single.root, job), _ckpt_filter_state(crash.last, kind), f"{kind}: restored vs ckpt ")

    # ... and ends where the uninterrupted run ends, bit for bit, over the same batches.
    resumed, full = _final(single.root, job), _final(single.root, f"full_{kind}")
    assert resumed["global_step"] == MAX_STEPS
    assert resumed["seen"] == full["seen"][2 * EVERY :]
    _assert_same(_trained(resumed), _trained(full), f"{kind}: resumed vs uninterrupted ")


@pytest.mark.parametrize("kind", KINDS)
def test_ddp_crash_resumes_bit_identical(ddp: Runs, kind: str) -> None:
    """The same under DDP: rank 0's checkpoint restores both ranks alike, and the end equals the unbroken run."""
    job = f"crash_{kind}"
    crash = ddp.crashes[job]
    _check_crash(crash, kind)

    # The checkpoint rank 0 wrote restored the same filter state on both ranks.
    saved = _ckpt_filter_state(crash.last, kind)
    for rank in (0, 1):
        _assert_same(_restored(ddp.root, job, rank), saved, f"{kind} rank {rank}: restored vs ckpt ")

    # Both ranks end where the uninterrupted DDP run ends, bit for bit, over the same batches.
    full = _final(ddp.root, f"full_{kind}", 0)
    for rank in (0, 1):
        resumed = _final(ddp.root, job, rank)
        assert resumed["global_step"] == MAX_STEPS
        assert resumed["seen"] == _final(ddp.root, f"full_{kind}", rank)["seen"][2 * EVERY :]
        _assert_same(_trained(resumed), _trained(full), f"{kind} rank {rank}: resumed vs uninterrupted ")


# ---------------------------------------------------------------------------------------------- 5. ckpt content
@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_holds_state_by_parameter_name(single: Runs, kind: str) -> None:
    """last.ckpt loads with ``weights_only=True``; the state sits under ``state_key``, by parameter name."""
    ckpt = torch.load(single.root / f"full_{kind}" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == MAX_STEPS
    config = FILTER_CONFIGS[kind]
    key = GrokfastCallback(**config).state_key
    assert key in ckpt["callbacks"]
    entry = ckpt["callbacks"][key]
    assert entry["config"]["filter"] == kind
    assert {k: entry["config"][k] for k in config} == config
    saved = entry["filter"]
    assert saved["kind"] == kind

    params = {name: value for name, value in ckpt["state_dict"].items()}
    assert saved["state"].keys() == params.keys()  # keyed by parameter name, every parameter present
    for name, state in saved["state"].items():
        shape = tuple(params[name].shape)
        if kind == "ema":
            assert set(state) == {"mu"}
            assert isinstance(state["mu"], Tensor) and tuple(state["mu"].shape) == shape
        else:
            assert set(state) == {"window", "sum", "count"}
            assert tuple(state["window"].shape) == (MA_WINDOW, *shape)
            assert tuple(state["sum"].shape) == shape
            assert state["count"] == MAX_STEPS
        assert all(not t.requires_grad for t in state.values() if isinstance(t, Tensor))

    # The last checkpoint is of the last step: its state is the live state the run ended with.
    _assert_same(saved, _final(single.root, f"full_{kind}")["filter"], f"{kind}: ckpt vs final ")


# ---------------------------------------------------------------------------------------------- 4. long runs
@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread (several threads on a tiny model just contend), then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _state_tensors(grad_filter: GradientFilter) -> list[Tensor]:
    return [v for s in grad_filter.state.values() for v in s.values() if isinstance(v, Tensor)]


def _rss_bytes() -> int:
    """Resident memory of this process (Linux: current; elsewhere: the peak)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _make_filter(kind: str, model: nn.Module) -> GradientFilter:
    if kind == "ema":
        return EMAFilter(model.named_parameters(), alpha=0.98, lamb=2.0)
    return MAFilter(model.named_parameters(), window_size=10, lamb=5.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("one_thread")
def test_plain_filter_memory_is_flat_over_thousands_of_steps(kind: str) -> None:
    """3000 plain-loop steps: constant state bytes and tensor count, no graph in the state, flat process RSS."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    opt = torch.optim.SGD(params, lr=1e-3)
    grad_filter = _make_filter(kind, model)
    x, y = torch.randn(16, 32), torch.randn(16, 32)
    expected_bytes = param_bytes * (1 if kind == "ema" else 10 + 1)  # EMA: mu; MA: ring of 10 + running sum
    steps, warm = 3000, 500
    rss_warm = 0
    for step in range(1, steps + 1):
        opt.zero_grad()
        nn.functional.mse_loss(model(x + 0.01 * step), y).backward()
        grad_filter.step()
        opt.step()
        assert grad_filter.state_bytes() == expected_bytes, f"step {step}"
        if step == 1 or step % 250 == 0:
            tensors = _state_tensors(grad_filter)
            assert len(tensors) == len(params) * (1 if kind == "ema" else 2), f"step {step}"
            assert all(not t.requires_grad and t.grad_fn is None for t in tensors), f"step {step}"
            assert all(p.grad is not None and p.grad.grad_fn is None for p in params)
        if step == warm:
            gc.collect()
            rss_warm = _rss_bytes()
    gc.collect()
    growth = _rss_bytes() - rss_warm
    # A leak of one gradient-sized copy per step would add (steps - warm) * param_bytes (about 40 MiB here).
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {steps - warm} steps"


class _Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class _StateProbe(Callback):
    """Every ``every`` steps, record the Grokfast filter's state tensors (count, bytes, graph) and live tensors."""

    def __init__(self, grokfast: GrokfastCallback, every: int) -> None:
        self.grokfast = grokfast
        self.every = every
        self.records: list[tuple[int, int, int, bool]] = []
        self.live: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step != 1 and step % self.every:
            return
        grad_filter = self.grokfast.grad_filter
        assert grad_filter is not None
        tensors = _state_tensors(grad_filter)
        graph = any(t.requires_grad or t.grad_fn is not None for t in tensors)
        self.records.append((step, len(tensors), grad_filter.state_bytes(), graph))
        if step % (2 * self.every) == 0:
            gc.collect()
            self.live.append(sum(1 for obj in gc.get_objects() if issubclass(type(obj), Tensor)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("one_thread")
def test_callback_state_is_flat_over_a_long_fit(tmp_path: Path, kind: str) -> None:
    """1000 Trainer steps: the callback's filter keeps a constant set of graph-free tensors; no tensors pile up."""
    torch.manual_seed(0)
    steps = 1000
    data = TensorDataset(torch.randn(800, 8), torch.randn(800, 4))  # 100 steps an epoch
    config = {"filter": "ema", "alpha": 0.98} if kind == "ema" else {"filter": "ma", "window_size": 10}
    grokfast = GrokfastCallback(**config)
    probe = _StateProbe(grokfast, every=100)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=[grokfast, probe],
        logger=CSVLogger(tmp_path),
        log_every_n_steps=50,  # the diagnostics are computed and logged on these steps
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = _Net()
    trainer.fit(model, DataLoader(data, batch_size=8))
    assert trainer.global_step == steps

    n_params = len(list(model.parameters()))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_param, copies = (1, 1) if kind == "ema" else (2, 10 + 1)
    assert [r[0] for r in probe.records] == [1, *range(100, steps + 1, 100)]
    for step, count, nbytes, graph in probe.records:
        assert count == n_params * per_param, f"step {step}: {count} state tensors"
        assert nbytes == param_bytes * copies, f"step {step}: {nbytes} state bytes"
        assert not graph, f"step {step}: a state tensor requires grad or holds a graph"
    # No tensors pile up anywhere in the process while the fit runs (filter, callback, logging).
    assert len(probe.live) == steps // 200
    assert max(probe.live) - min(probe.live) <= 2, probe.live
