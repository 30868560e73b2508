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

from lightning_grokfast.filters import dots, sq_norms
from lightning_grokfast.settings import OrthoGradSettings
from lightning_grokfast.transform import GradientTransform, Group, Params, compute_dtype


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


def _flat(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors (of one dtype), flattened, in their compute dtype: views where they already are."""
    dtype = compute_dtype(tensors[0].dtype)
    if tensors[0].dtype == dtype:
        return [t.reshape(-1) for t in tensors]
    return [t.reshape(-1).to(dtype) for t in tensors]


def _exact_dots(w: Tensor, g: Tensor) -> Tensor:
    """``|g|^2, <w, g>, <w, w>`` of one pair in float64 from float64 copies: sums of products without rounding
    (float32 products are exact in float64), so that a sum over pieces gives ``|g_perp|`` to far below the radial
    tolerance. One pair at a time, so that the copies stay one tensor's size."""
    w64, g64 = w.double(), g.double()
    return torch.stack([torch.dot(g64, g64), torch.dot(w64, g64), torch.dot(w64, w64)])


def _coefficients(wg: Tensor, ww: Tensor) -> Tensor:
    """``<w, g> / <w, w>`` per pair, 0 where ``w`` is 0."""
    return torch.where(ww > 0, wg / ww, torch.zeros_like(ww))


def _rescale(perp_norms: Tensor, g_norms: Tensor, grad_dtype: torch.dtype) -> Tensor:
    """``|g| / |g_perp|``, or 0 where ``g_perp`` is rounding residue of a radial gradient: below 32 units of the
    compute dtype's rounding, or one of the gradient's own (a 16-bit gradient is rounded before it arrives)."""
    tol = max(32 * torch.finfo(perp_norms.dtype).eps, torch.finfo(grad_dtype).eps) * g_norms
    return torch.where(perp_norms > tol, g_norms / perp_norms, torch.zeros_like(perp_norms))


def _single_tensor_orthograd(
    ws: list[Tensor], gs: list[Tensor], out: list[Tensor], g_norms: Tensor, coef: Tensor, perp: Optional[Tensor]
) -> None:
    for i, (w, g, o, c, g_norm) in enumerate(zip(ws, gs, out, coef, g_norms)):
        g.addcmul_(w, c, value=-1.0)
        g.mul_(_rescale(torch.linalg.vector_norm(g) if perp is None else perp[i], g_norm, o.dtype))
        if g.data_ptr() != o.data_ptr():
            o.copy_(g.view_as(o))


def _multi_tensor_orthograd(
    ws: list[Tensor], gs: list[Tensor], out: list[Tensor], g_norms: Tensor, coef: Tensor, perp: Optional[Tensor]
) -> None:
    """``gs``: flat float32-or-wider views or copies of the gradients ``out``; ``ws``: flat weights, alike;
    ``perp``: the norms of the orthogonal parts when known (sharded), else taken after the projection."""
    torch._foreach_addcmul_(gs, ws, list(coef.unbind()), value=-1.0)
    perp = torch.stack(torch._foreach_norm(gs)) if perp is None else perp
    scale = _rescale(perp, g_norms, out[0].dtype)
    torch._foreach_mul_(gs, list(scale.unbind()))
    copies = [(o, g.view_as(o)) for g, o in zip(gs, out) if g.data_ptr() != o.data_ptr()]
    if copies:  # 16-bit or non-contiguous gradients were worked on in a copy
        torch._foreach_copy_([o for o, _ in copies], [g for _, g in copies])


class OrthoGrad(GradientTransform[OrthoGradSettings]):
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

    settings_type = OrthoGradSettings

    def __init__(
        self,
        params: Params,
        apply_to: Literal["all", "matrices"] = "all",
        *,
        skip_nonfinite: bool = True,
        foreach: Optional[bool] = None,
    ) -> None:
        super().__init__(params, OrthoGradSettings(apply_to, skip_nonfinite=skip_nonfinite, foreach=foreach))

    def _selects(self, param: Tensor) -> bool:
        return self.settings.apply_to == "all" or param.dim() >= 2

    def _place(self, group: Group) -> None:
        pass  # stateless

    def _stats(self, applied: bool, skipped_nonfinite: bool = False) -> OrthoGradStats:
        return OrthoGradStats(applied=applied, skipped_nonfinite=skipped_nonfinite)

    def _prepare(self, group: Group, compute_stats: bool) -> dict[str, Any]:
        ws, gs = _flat(group.params), _flat(group.grads)  # gs: the gradients themselves, or float32 copies
        if self._sharding is not None:  # exact sums of the pieces, from which |g_perp| follows (see _apply)
            exact = torch.stack([_exact_dots(w, g) for w, g in zip(ws, gs)]).T
            return {"sq_norms": exact[0], "wg": exact[1], "ww": exact[2], "ws": ws, "gs": gs}
        # <w, w> rounds as <w, g> does: for a radial gradient the two roundings of one kind cancel
        return {"sq_norms": sq_norms(gs), "wg": dots(ws, gs), "ww": dots(ws, ws), "ws": ws, "gs": gs}

    def _apply(self, groups: list[Group], prepared: list[dict[str, Any]], compute_stats: bool) -> OrthoGradStats:
        update = _single_tensor_orthograd if self.settings.foreach is False else _multi_tensor_orthograd
        radial = raw = 0.0
        for group, pre in zip(groups, prepared):
            dtype = pre["gs"][0].dtype
            perp = None
            if self._sharding is not None:  # the pieces' sums are global: |g_perp|^2 = |g|^2 - <w, g>^2 / <w, w>
                along = torch.where(pre["ww"] > 0, pre["wg"].square() / pre["ww"], torch.zeros_like(pre["ww"]))
                perp = (pre["sq_norms"] - along).clamp_min(0).sqrt().to(dtype)
            wg, ww, g_norms = pre["wg"].to(dtype), pre["ww"].to(dtype), pre["sq_norms"].sqrt().to(dtype)
            coef = _coefficients(wg, ww)
            update(pre["ws"], pre["gs"], group.grads, g_norms, coef, perp)
            if compute_stats:
                radial += float((coef * wg).double().sum())
                raw += float(pre["sq_norms"].sum())
        num = sum(len(g.grads) for g in groups)
        fraction = min(1.0, math.sqrt(radial / raw)) if compute_stats and raw > 0 else None  # rounding: at most 1
        return OrthoGradStats(applied=True, num_tensors=num, radial_fraction=fraction)
