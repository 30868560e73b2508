"""Bad input is refused up front, with an error naming the argument, the value and what is accepted."""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch

from lightning_grokfast import EMAFilter, GrokfastCallback, MAFilter

BAD_CALLBACK_ARGS = [
    ("filter", "sma", r"`filter` must be one of 'ema', 'ma', got 'sma'"),
    ("filter", None, r"`filter` must be one of"),
    ("alpha", 1.0, r"`alpha` must be a number in \[0, 1\).*got 1\.0"),
    ("alpha", -0.1, r"`alpha` must be a number in \[0, 1\).*got -0\.1"),
    ("alpha", math.nan, r"`alpha` must be a number in \[0, 1\).*got nan"),
    ("alpha", "0.9", r"`alpha` must be a number in \[0, 1\).*got '0\.9'"),
    ("alpha", True, r"`alpha` must be a number"),
    ("lamb", -1.0, r"`lamb` must be a finite number >= 0.*got -1\.0"),
    ("lamb", math.inf, r"`lamb` must be a finite number >= 0.*got inf"),
    ("lamb", math.nan, r"`lamb` must be a finite number >= 0.*got nan"),
    ("lamb", "2", r"`lamb` must be a finite number"),
    ("window_size", 0, r"`window_size` must be an integer >= 1, got 0"),
    ("window_size", 2.5, r"`window_size` must be an integer >= 1, got 2\.5"),
    ("window_size", True, r"`window_size` must be an integer >= 1, got True"),
    ("warmup", "yes", r"`warmup` must be True or False, got 'yes'"),
    ("reduction", "median", r"`reduction` must be one of 'mean', 'sum', got 'median'"),
    ("log_diagnostics", 1, r"`log_diagnostics` must be True or False, got 1"),
    ("skip_nonfinite", None, r"`skip_nonfinite` must be True or False, got None"),
    ("fp32_state", "no", r"`fp32_state` must be True or False, got 'no'"),
    ("foreach", "auto", r"`foreach` must be True or False, got 'auto'"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_CALLBACK_ARGS)
def test_callback_rejects_bad_argument(name: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GrokfastCallback(**{name: value})


def test_every_callback_argument_is_checked() -> None:
    checked = {name for name, _, _ in BAD_CALLBACK_ARGS}
    assert checked == set(inspect.signature(GrokfastCallback).parameters)


def test_every_callback_argument_is_typed_and_documented() -> None:
    """LightningCLI builds its parser and --help from the type hints and the ``Args:`` docstring."""
    doc = inspect.getdoc(GrokfastCallback) or ""
    for name, param in inspect.signature(GrokfastCallback).parameters.items():
        assert param.annotation is not inspect.Parameter.empty, name
        assert f"    {name}: " in doc, f"{name} missing from the Args: section"


def test_lamb_defaults_follow_the_filter() -> None:
    assert GrokfastCallback().lamb == 2.0
    assert GrokfastCallback(filter="ma").lamb == 5.0
    assert GrokfastCallback(filter="ma", lamb=0.0).lamb == 0.0


def test_callback_accepts_the_edges_of_each_range() -> None:
    cb = GrokfastCallback(alpha=0, lamb=0, window_size=1, foreach=False)
    assert (cb.alpha, cb.lamb, cb.window_size) == (0.0, 0.0, 1)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (EMAFilter, {"alpha": 1.5}, r"`alpha`"),
        (EMAFilter, {"lamb": -2.0}, r"`lamb`"),
        (EMAFilter, {"skip_nonfinite": "no"}, r"`skip_nonfinite`"),
        (EMAFilter, {"foreach": 0}, r"`foreach`"),
        (MAFilter, {"window_size": 0}, r"`window_size`"),
        (MAFilter, {"lamb": math.inf}, r"`lamb`"),
        (MAFilter, {"warmup": None}, r"`warmup`"),
        (MAFilter, {"reduction": "max"}, r"`reduction`"),
    ],
)
def test_filter_rejects_bad_argument(cls: type, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


P = torch.nn.Parameter(torch.zeros(2))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ([], "`params` is empty"),
        ([P, ("b", torch.nn.Parameter(torch.zeros(1)))], "not a mix"),
        ([("a", P), ("a", torch.nn.Parameter(torch.zeros(1)))], "names 'a' twice"),
        ([("a", 3.0)], "must hold tensors"),
    ],
    ids=["empty", "mix", "twice", "not-a-tensor"],
)
def test_filter_rejects_bad_params(params: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EMAFilter(params)


def test_step_rejects_an_unregistered_parameter() -> None:
    f, q = EMAFilter([("p", P)]), torch.nn.Parameter(torch.zeros(3))
    q.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"shape \(3,\).*not registered"):
        f.step([q])


def test_step_rejects_a_sparse_gradient() -> None:
    emb = torch.nn.Embedding(5, 2, sparse=True)
    g = EMAFilter(emb.named_parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="'weight' has a sparse gradient"):
        g.step()
