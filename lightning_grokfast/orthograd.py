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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import Tensor

from lightning_grokfast import _fused
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


def _coefficients(wg: Tensor, ww: Tensor) -> Tensor:
    """``<w, g> / <w, w>`` per pair, 0 where ``w`` is 0."""
    return torch.where(ww > 0, wg / ww, torch.zeros_like(ww))


def _rescale(perp_norms: Tensor, g_norms: Tensor, grad_dtype: torch.dtype) -> Tensor:
    """``|g| / |g_perp|``, or 0 where ``g_perp`` is rounding residue of a radial gradient: below 32 units of the
    compute dtype's rounding, or one of the gradient's own (a 16-bit gradient is rounded before it arrives)."""
    tol = max(32 * torch.finfo(perp_norms.dtype).eps, torch.finfo(grad_dtype).eps) * g_norms
    return torch.where(perp_norms > tol, g_norms / perp_norms, torch.zeros_like(perp_norms))


Total = Optional[Callable[[Tensor, list[int]], Tensor]]  # sharded: sums over the pieces of the tensors at these
# indices -> sums over the whole tensors (an all-reduce); None when not sharded


def _single_tensor_orthograd(
    ws: list[Tensor], gs: list[Tensor], out: list[Tensor], g_norms: Tensor, coef: Tensor, ww: Tensor, total: Total
) -> None:
    perp = []
    for w, g, c in zip(ws, gs, coef):
        g.addcmul_(w, c, value=-1.0)
        perp.append(torch.linalg.vector_norm(g))
    scale = _rescale(_finish(ws, gs, torch.stack(perp), g_norms, ww, total), g_norms, out[0].dtype)
    for g, o, s in zip(gs, out, scale):
        g.mul_(s)
        if g.data_ptr() != o.data_ptr():
            o.copy_(g.view_as(o))


def _multi_tensor_orthograd(
    ws: list[Tensor], gs: list[Tensor], out: list[Tensor], g_norms: Tensor, coef: Tensor, ww: Tensor, total: Total
) -> None:
    """``gs``: flat float32-or-wider views or copies of the gradients ``out``; ``ws``: flat weights, alike."""
    torch._foreach_addcmul_(gs, ws, list(coef.unbind()), value=-1.0)
    perp = _finish(ws, gs, torch.stack(torch._foreach_norm(gs)), g_norms, ww, total)
    _scale_and_copy(gs, out, _rescale(perp, g_norms, out[0].dtype))


def _dots_kernel(ws: list[Tensor], gs: list[Tensor]) -> Tensor:
    """What the fused path compiles for :meth:`OrthoGrad._prepare`: per tensor ``|g|^2, <w, g>, <w, w>`` in one read
    of the flat weight and gradient (``<w, w>`` rounds as ``<w, g>`` does)."""
    return torch.stack([torch.stack([(g * g).sum(), (w * g).sum(), (w * w).sum()]) for w, g in zip(ws, gs)]).double()


def _projection_kernel(ws: list[Tensor], gs: list[Tensor], coef: Tensor) -> Tensor:
    """What :func:`_fused_orthograd` compiles: per tensor, the projection in place and its norm, in one pass."""
    norms = []
    for i, (w, g) in enumerate(zip(ws, gs)):
        g.copy_(g - coef[i] * w)
        norms.append(torch.linalg.vector_norm(g))
    return torch.stack(norms)


def _fused_orthograd(
    ws: list[Tensor], gs: list[Tensor], out: list[Tensor], g_norms: Tensor, coef: Tensor, ww: Tensor, total: Total
) -> None:
    perp = _finish(ws, gs, _fused.run(_projection_kernel, (ws, gs), (coef,)), g_norms, ww, total)
    _scale_and_copy(gs, out, _rescale(perp, g_norms, out[0].dtype))


def _scale_and_copy(gs: list[Tensor], out: list[Tensor], scale: Tensor) -> None:
    torch._foreach_mul_(gs, list(scale.unbind()))
    copies = [(o, g.view_as(o)) for g, o in zip(gs, out) if g.data_ptr() != o.data_ptr()]
    if copies:  # 16-bit or non-contiguous gradients were worked on in a copy
        torch._foreach_copy_([o for o, _ in copies], [g for _, g in copies])


def _finish(ws: list[Tensor], gs: list[Tensor], perp: Tensor, g_norms: Tensor, ww: Tensor, total: Total) -> Tensor:
    """The norms of the projections ``gs`` of the whole tensors (summed over the pieces when sharded), after a second
    projection of those whose orthogonal part is below 1e-3 of ``|g|``. There, the rounding of ``<w, g>``, which grows
    with the tensor's size, can leave a radial remainder that rescaling to ``|g|`` would turn into a step along
    ``-w`` (seen for a radial gradient of 16M float32 values); once more projected, it is rounding residue again."""

    def whole(sums: Tensor, index: list[int]) -> Tensor:
        return sums if total is None else total(sums, index)

    if total is not None:
        perp = total(perp.double().square(), list(range(len(gs)))).sqrt().to(perp.dtype)
    near = torch.nonzero(perp < 1e-3 * g_norms).flatten().tolist()
    if near:
        w_, g_ = [ws[i] for i in near], [gs[i] for i in near]
        again = _coefficients(whole(dots(w_, g_), near).to(ww.dtype), ww[near])
        torch._foreach_addcmul_(g_, w_, list(again.unbind()), value=-1.0)
        perp = perp.clone()
        perp[near] = whole(sq_norms(g_), near).sqrt().to(perp.dtype)
    return perp


_ORTHOGRAD = {"single": _single_tensor_orthograd, "multi": _multi_tensor_orthograd, "fused": _fused_orthograd}


class OrthoGrad(GradientTransform[OrthoGradSettings]):
    """⊥Grad: remove from every gradient its component along its own weight, keeping the gradient's norm.

    Stateless: nothing to checkpoint, no memory beyond a step's temporaries.

    Args:
        params: parameters, or ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        apply_to: ``"all"`` parameters, or only ``"matrices"`` (tensors of two or more dimensions: weights and
            embeddings, not biases, LayerNorm gains or scalars).
        skip_nonfinite: skip steps whose gradients hold inf or NaN, leaving the gradients untouched.
        foreach: multi-tensor ``torch._foreach_*`` path (``None``/``True``) or a per-tensor loop (``False``).
        fused: one fused kernel per group, built by ``torch.compile`` at the first step (see
            :class:`~lightning_grokfast.settings.Settings`).

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
        fused: Optional[bool] = None,
    ) -> None:
        options: dict[str, Any] = {"skip_nonfinite": skip_nonfinite, "foreach": foreach, "fused": fused}
        super().__init__(params, OrthoGradSettings(apply_to, **options))

    def _selects(self, param: Tensor) -> bool:
        return self.settings.apply_to == "all" or param.dim() >= 2

    def _place(self, group: Group) -> None:
        pass  # stateless

    def _stats(self, applied: bool, skipped_nonfinite: bool = False) -> OrthoGradStats:
        return OrthoGradStats(applied=applied, skipped_nonfinite=skipped_nonfinite)

    def _prepare(self, group: Group, compute_stats: bool) -> dict[str, Any]:
        ws, gs = _flat(group.params), _flat(group.grads)  # gs: the gradients themselves, or float32 copies
        if group.path == "fused":
            sums = _fused.run(_dots_kernel, (ws, gs), ())
            return {"sq_norms": sums[:, 0], "wg": sums[:, 1], "ww": sums[:, 2], "ws": ws, "gs": gs}
        # <w, w> rounds as <w, g> does: for a radial gradient the two roundings of one kind cancel
        return {"sq_norms": sq_norms(gs), "wg": dots(ws, gs), "ww": dots(ws, ws), "ws": ws, "gs": gs}

    def _apply(self, groups: list[Group], prepared: list[dict[str, Any]], compute_stats: bool) -> OrthoGradStats:
        radial = raw = 0.0
        for group, pre in zip(groups, prepared):
            dtype = compute_dtype(group.grads[0].dtype)
            wg, ww, g_norms = pre["wg"].to(dtype), pre["ww"].to(dtype), pre["sq_norms"].sqrt().to(dtype)
            coef = _coefficients(wg, ww)
            _ORTHOGRAD[group.path](pre["ws"], pre["gs"], group.grads, g_norms, coef, ww, self._total(group))
            if compute_stats:
                radial += float((coef * wg).double().sum())
                raw += float(pre["sq_norms"].sum())
        num = sum(len(g.grads) for g in groups)
        fraction = min(1.0, math.sqrt(radial / raw)) if compute_stats and raw > 0 else None  # rounding: at most 1
        return OrthoGradStats(applied=True, num_tensors=num, radial_fraction=fraction)

    def _total(self, group: Group) -> Total:
        """Sharded: per-tensor sums over this rank's pieces -> over the whole tensors (the step's second all-reduce,
        for the norms of the projections); ``None`` otherwise."""
        if self._sharding is None or group.weights is None:
            return None
        sharding, weights = self._sharding, group.weights

        def total(sums: Tensor, index: list[int]) -> Tensor:
            return sharding.sum(sums.double() * weights[index].to(sums.device))

        return total
