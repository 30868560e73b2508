"""⊥Grad, the orthogonal gradient (Prieto et al. 2025, arXiv 2501.04697), in plain PyTorch (no Lightning).

Per parameter tensor ``w`` with gradient ``g``::

    g_perp = g - (<w, g> / <w, w>) w        # drop the radial part, which only rescales w
    g      = g_perp * |g| / |g_perp|        # keep the gradient's norm

Without weight decay, training pushes the weights along their own direction (it scales the logits) until the
softmax saturates and learning stalls; removing the radial part of the gradient stops that.

Rules at the edges: a weight of zero leaves its gradient as it is (no direction to remove). A gradient that is
radial to within rounding (``|g_perp|`` below ``32 * eps`` of the compute dtype, or below one ``eps`` of the
gradient's own dtype, times ``|g|``; so always for a nonzero scalar parameter) is set to zero: there is no
orthogonal direction to move along, and rescaling the rounding residue to ``|g|`` would step in a random
direction. ``pytorch_optimizer.OrthoGrad`` (4.1) does the latter on its per-tensor path and zeroes below 4 eps on
its foreach path; elsewhere the results agree. The arithmetic is in float32 at least and the result is written
back in the gradient's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import Tensor

from lightning_grokfast._base import LOW_PRECISION, Entry, GradientTransform, Params, dots, safe_div
from lightning_grokfast._validation import check_choice

APPLY_TO = ("all", "matrices")


@dataclass(frozen=True)
class OrthoGradStats:
    """What one :meth:`OrthoGrad.step` did.

    Attributes:
        applied: whether gradients were transformed (False when nothing had a gradient, or the step was skipped
            because a gradient held inf or NaN).
        skipped_nonfinite: whether the step was skipped because a gradient held inf or NaN.
        num_tensors: how many gradients were transformed.
        radial_fraction: ``|radial part| / |g|`` over all transformed gradients (only with ``compute_stats``):
            0 when the gradients were already orthogonal to their weights, 1 when they only rescaled them.
    """

    applied: bool
    skipped_nonfinite: bool = False
    num_tensors: int = 0
    radial_fraction: Optional[float] = None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in LOW_PRECISION else dtype


def _in_compute_dtype(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors, flattened, in float32 at least (views where they already are)."""
    return [t.reshape(-1).to(_compute_dtype(t.dtype)) for t in tensors]


def _coefficients(ws: list[Tensor], gs: list[Tensor], ww: Tensor) -> tuple[Tensor, Tensor]:
    """``<w, g> / <w, w>`` per pair (0 where ``w`` is 0), and the squared norms of the radial parts."""
    wg = dots(ws, gs).to(ww.dtype)
    coef = torch.where(ww > 0, wg / ww, torch.zeros_like(ww))
    return coef, coef * wg


def _rescale(perp_norms: Tensor, g_norms: Tensor, grad_dtype: torch.dtype) -> Tensor:
    """``|g| / |g_perp|``, or 0 where ``g_perp`` is rounding residue of a radial gradient: below 32 units of the
    compute dtype's rounding, or one of the gradient's own (a 16-bit gradient is rounded before it arrives)."""
    tol = max(32 * torch.finfo(perp_norms.dtype).eps, torch.finfo(grad_dtype).eps) * g_norms
    return torch.where(perp_norms > tol, g_norms / perp_norms, torch.zeros_like(perp_norms))


def _orthograd_single(ws: list[Tensor], gs: list[Tensor], g_norms: Tensor) -> Tensor:
    """Orthogonalize ``gs`` against ``ws`` in place, one tensor at a time; return the radial parts' squared norms."""
    w_, g_ = _in_compute_dtype(ws), _in_compute_dtype(gs)
    ww = dots(w_, w_).to(w_[0].dtype)
    coef, radial_sq = _coefficients(w_, g_, ww)
    for w, g, c, g_norm, out in zip(w_, g_, coef, g_norms.to(ww.dtype), gs):
        g.addcmul_(w, c, value=-1.0)
        g.mul_(_rescale(torch.linalg.vector_norm(g), g_norm, out.dtype))
        if g.data_ptr() != out.data_ptr():
            out.copy_(g.view_as(out))
    return radial_sq.double()


def _orthograd_foreach(ws: list[Tensor], gs: list[Tensor], g_norms: Tensor) -> Tensor:
    """:func:`_orthograd_single` with ``torch._foreach_*`` kernels for everything but the dot products."""
    w_, g_ = _in_compute_dtype(ws), _in_compute_dtype(gs)
    ww = dots(w_, w_).to(w_[0].dtype)  # as <w, g>: two roundings of one kind cancel for a radial gradient
    coef, radial_sq = _coefficients(w_, g_, ww)
    torch._foreach_addcmul_(g_, w_, list(coef.unbind()), value=-1.0)
    scale = _rescale(torch.stack(torch._foreach_norm(g_)), g_norms.to(ww.dtype), gs[0].dtype)
    torch._foreach_mul_(g_, list(scale.unbind()))
    copies = [(out, g.view_as(out)) for g, out in zip(g_, gs) if g.data_ptr() != out.data_ptr()]
    if copies:  # 16-bit or non-contiguous gradients were worked on in a copy
        torch._foreach_copy_([out for out, _ in copies], [g for _, g in copies])
    return radial_sq.double()


class OrthoGrad(GradientTransform):
    """⊥Grad: remove from every gradient its component along its own weight, keeping the gradient's norm.

    Stateless: nothing to checkpoint, no memory beyond a step's temporaries.

    Args:
        params: parameters, or ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        apply_to: ``"all"`` parameters, or only ``"matrices"`` (tensors of two or more dimensions: weights and
            embeddings, not biases, LayerNorm gains or scalars).
        skip_nonfinite: skip steps whose gradients hold inf or NaN, leaving the gradients untouched.
        foreach: multi-tensor ``torch._foreach_*`` path (``None``/``True``) or a per-tensor loop (``False``).

    Example::

        orthograd = OrthoGrad(model.named_parameters())
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            orthograd.step()
            optimizer.step()
    """

    kind = "orthograd"
    _wants_norms = True
    _stateful = False

    def __init__(
        self,
        params: Params,
        apply_to: Literal["all", "matrices"] = "all",
        *,
        skip_nonfinite: bool = True,
        foreach: Optional[bool] = None,
    ) -> None:
        self.apply_to = check_choice("apply_to", apply_to, APPLY_TO)
        super().__init__(params, skip_nonfinite=skip_nonfinite, foreach=foreach)

    def set_parameters(self, params: Params) -> None:
        super().set_parameters(params)
        if self.apply_to == "matrices":
            self._applies = {id(p) for p in self._params.values() if p.dim() >= 2}
        else:
            self._applies = set(self._names)

    def hparams(self) -> dict[str, Any]:
        return {"apply_to": self.apply_to}

    def _entries(self, params: Any) -> list[Entry]:
        return [e for e in super()._entries(params) if id(e.param) in self._applies]

    def _stats(self, applied: bool, skipped_nonfinite: bool = False) -> OrthoGradStats:
        return OrthoGradStats(applied=applied, skipped_nonfinite=skipped_nonfinite)

    def _apply(
        self, groups: list[list[Entry]], foreach: list[bool], raw_norms: Optional[list[Tensor]], compute_stats: bool
    ) -> OrthoGradStats:
        assert raw_norms is not None
        radial = raw = 0.0
        for group, fe, g_norms in zip(groups, foreach, raw_norms):
            ws, gs = [e.param.detach() for e in group], [e.grad for e in group]
            radial_sq = (_orthograd_foreach if fe else _orthograd_single)(ws, gs, g_norms)
            if compute_stats:
                radial += float(radial_sq.sum())
                raw += float(g_norms.double().square().sum())
        num = sum(len(g) for g in groups)
        fraction = safe_div(math.sqrt(radial), math.sqrt(raw)) if compute_stats else None
        return OrthoGradStats(applied=True, num_tensors=num, radial_fraction=fraction)
