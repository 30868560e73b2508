"""DDP, crash-and-resume and long-run behaviour, the training runs in subprocesses (``scripts/grokfast_train.py``).

* DDP on CPU (gloo, two processes, each rank on other samples): the filter works on the all-reduced gradient, so
  both ranks hold the same state with no communication of their own, and the run equals one process over the
  union of the ranks' batches.
* A run SIGKILLed after step 8 and resumed with ``ckpt_path="last"`` (one process and DDP) ends bit for bit where
  an uninterrupted run ends: weights and filter state (the MA ring position included).
* The checkpoint loads with ``weights_only=True`` and holds the state by parameter name under ``state_key``.
* A long fit keeps the callback's state flat and piles up no tensors.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from grokfast_train import CONFIGS, EVERY, MAX_STEPS
from helpers import TinyModel, assert_state_equal, make_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_grokfast import GrokfastCallback

SCRIPT = Path(__file__).parent / "scripts" / "grokfast_train.py"
KINDS = ("ema", "ma")
SAVED_AT = 2 * EVERY  # the crashed runs die after step 8; their last checkpoint is the one of step 6


def launch(root: Path, devices: int, *jobs: str) -> int:
    """Run the script in a session of its own (it may SIGKILL its process group) with a clean environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "SLURM_", "TORCHELASTIC_", "PL_"))}
    env = {k: v for k, v in env.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with (root / "log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, root, str(devices), *jobs], stdout=log, stderr=log, env=env, start_new_session=True
        )
        try:
            return proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError((root / "log").read_text()[-4000:]) from None


def runs(root: Path, devices: int, first: str, second: str) -> dict[str, Any]:
    """Full EMA and MA runs; a ``first`` run crashed, then resumed in the process that crashes a ``second`` run,
    then that one resumed. Returns, per crashed kind, the exit code, checkpoint files and last.ckpt of the crash."""
    crashes = {}
    for jobs, kind in (([f"full_{k}:{k}:full" for k in KINDS], first), ([f"crash_{first}:{first}:resume"], second)):
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
    """What must match between two runs: the weights and the whole filter state."""
    return {"model": final["model"], "filter": final["filter"]}


def saved_filter(ckpt: dict[str, Any], kind: str) -> dict[str, Any]:
    return ckpt["callbacks"][GrokfastCallback(**CONFIGS[kind]).state_key]["filter"]


@pytest.mark.parametrize("kind", KINDS)
def test_ddp_ranks_agree_and_equal_single_process(single: dict[str, Any], ddp: dict[str, Any], kind: str) -> None:
    rank0, rank1, one = load(ddp, f"full_{kind}"), load(ddp, f"full_{kind}", rank=1), load(single, f"full_{kind}")
    assert rank0["global_step"] == rank1["global_step"] == one["global_step"] == MAX_STEPS
    assert len(rank0["seen"]) == len(rank1["seen"]) == len(one["seen"]) == MAX_STEPS
    for step, (s0, s1, s) in enumerate(zip(rank0["seen"], rank1["seen"], one["seen"])):
        assert not set(s0) & set(s1) and sorted(s0 + s1) == sorted(s), step  # other samples, together the batch
    # no communication of its own, and yet the same state on both ranks: it filtered the all-reduced gradient ...
    assert rank0["collectives"] == rank1["collectives"] == 0
    assert_state_equal(trained(rank0), trained(rank1))
    assert set(rank0["filter"]["state"]) == set(rank0["model"]) - {"frozen"}
    if kind == "ma":
        assert all(s["count"] == MAX_STEPS for s in rank0["filter"]["state"].values())
    # ... which is the mean over the global batch: DDP equals one process over both ranks' batches
    assert_state_equal(trained(rank0), trained(one), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", ["single", "ddp"])
def test_crash_resumes_bit_identical(request: pytest.FixtureRequest, group: str, kind: str) -> None:
    """SIGKILLed after step 8 with the step-6 last.ckpt and none later; resumed from it, every rank restores the
    checkpoint's filter state (rank 0 wrote it) and ends bit for bit as the uninterrupted run, over its batches."""
    group_runs = request.getfixturevalue(group)
    code, files, last = group_runs["crashes"][kind]
    assert code == -signal.SIGKILL and last["global_step"] == SAVED_AT
    assert max(int(f.split("step=")[1].split(".")[0]) for f in files if "step=" in f) == SAVED_AT, files
    if kind == "ma":  # the ring has wrapped and the next write goes mid-way into it
        assert {s["count"] for s in saved_filter(last, kind)["state"].values()} == {SAVED_AT}
        assert CONFIGS["ma"]["window_size"] < SAVED_AT and SAVED_AT % CONFIGS["ma"]["window_size"]
    for rank in range(1 if group == "single" else 2):
        assert_state_equal(load(group_runs, f"crash_{kind}", "restored", rank), saved_filter(last, kind))
        resumed, full = load(group_runs, f"crash_{kind}", rank=rank), load(group_runs, f"full_{kind}", rank=rank)
        assert resumed["global_step"] == MAX_STEPS and resumed["seen"] == full["seen"][SAVED_AT:]
        assert_state_equal(trained(resumed), trained(load(group_runs, f"full_{kind}")))


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_holds_state_by_parameter_name(single: dict[str, Any], kind: str) -> None:
    ckpt = torch.load(single["root"] / f"full_{kind}" / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == MAX_STEPS
    entry = ckpt["callbacks"][GrokfastCallback(**CONFIGS[kind]).state_key]
    assert {k: entry["config"][k] for k in CONFIGS[kind]} == CONFIGS[kind] and entry["filter"]["kind"] == kind
    params = {n: p for n, p in ckpt["state_dict"].items() if n != "frozen"}  # every trainable parameter
    assert entry["filter"]["state"].keys() == params.keys()
    for name, state in entry["filter"]["state"].items():
        shape = tuple(params[name].shape)
        if kind == "ema":
            assert set(state) == {"mu"} and tuple(state["mu"].shape) == shape
        else:
            assert set(state) == {"window", "sum", "count"} and state["count"] == MAX_STEPS
            assert tuple(state["window"].shape) == (CONFIGS["ma"]["window_size"], *shape)
            assert tuple(state["sum"].shape) == shape
        assert all(not t.requires_grad for t in state.values() if isinstance(t, torch.Tensor))
    # the last checkpoint is of the last step: its state is the live state the run ended with
    assert_state_equal(entry["filter"], load(single, f"full_{kind}")["filter"])


class StateProbe(Callback):
    """Every 100 steps (and at step 1): the filter's state tensor count, bytes and whether one holds a graph;
    every 200 steps the number of live tensors in the process."""

    def __init__(self, grokfast: GrokfastCallback) -> None:
        self.grokfast = grokfast
        self.records: list[tuple[int, int, int, bool]] = []
        self.live: list[int] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        step, transform = trainer.global_step, self.grokfast.transform
        if step == 1 or step % 100 == 0:
            tensors = [v for s in transform.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
            graph = any(t.requires_grad or t.grad_fn is not None for t in tensors)
            self.records.append((step, len(tensors), transform.state_bytes(), graph))
        if step % 200 == 0:
            gc.collect()
            self.live.append(sum(issubclass(type(obj), torch.Tensor) for obj in gc.get_objects()))


@pytest.mark.parametrize(("kind", "copies"), [("ema", 1), ("ma", 10 + 1)])
def test_callback_state_is_flat_over_a_long_fit(tmp_path: Path, kind: str, copies: int) -> None:
    """1000 steps, diagnostics logged every 50: a constant set of graph-free state tensors, no tensors pile up."""
    grokfast, model = GrokfastCallback(filter=kind, alpha=0.98, window_size=10), TinyModel(lr=1e-3, samples=800)
    probe = StateProbe(grokfast)
    trainer = make_trainer(tmp_path, [grokfast, probe], 1000, logger=CSVLogger(tmp_path), log_every_n_steps=50)
    trainer.fit(model)  # 100 steps an epoch
    assert trainer.global_step == 1000
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [r[0] for r in probe.records] == [1, *range(100, 1001, 100)]
    for step, count, nbytes, graph in probe.records:
        assert count == len(trainable) * (1 if kind == "ema" else 2), step
        assert nbytes == copies * sum(4 * p.numel() for p in trainable), step
        assert not graph, step
    assert len(probe.live) == 5 and max(probe.live) - min(probe.live) <= 2, probe.live
