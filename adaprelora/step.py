"""AdaPreLoRA's step for one bucket of pairs: one signature, two implementations.

As `torch.optim.adam` picks `_single_tensor_adam`, `_multi_tensor_adam` or `_fused_adam`,
`adaprelora_step(...)` picks the implementation: `_torch_adaprelora_step` (batched torch ops over
the stacked bucket, the readable reference) or the fused Triton kernels
(`kernels.fused_step.fused_bucket_step`). Both take the pairs' tensors as lists, the gradient
energies, the bucket's stacked state and the hyperparameters as keywords; both update the factors
and the state in place and return which pairs they updated. The r x r algebra (ridge, Cholesky,
the balanced solve, the clip factor, the rebalance) is `functional`'s in both.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import functional as F


def adaprelora_step(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], gradA: Sequence[Optional[torch.Tensor]],
                    gradB: Sequence[Optional[torch.Tensor]], row, col, state: dict, scale: torch.Tensor, lr, *,
                    variant: str = "adamw", betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                    momentum: float = 0.0, decay_rate: float = -0.8, eps_factored: float = 1e-30,
                    clip_threshold: Optional[float] = 1.0, damping: float = 0.1, rebalance: bool = True,
                    backend: str = "torch") -> torch.Tensor:
    """One AdaPreLoRA step (spec 3.2 to 3.5) for a bucket of k pairs of equal (m, n, r, dtype).

    Args:
        A, B: the k factors (r, n) / (m, r) (conv: (r, in, kh, kw) / (out, r, 1, 1)); updated in place.
        gradA, gradB: their `.grad`s (the LoRA scale s included); None for a pair without gradients
            (torch backend only), which is left untouched.
        row, col: gradient energies, (k, m) / (k, n) or lists of (m,) / (n,).
        state: the bucket's stacked state (`base.Bucket.state`), updated in place.
        scale: (k,) LoRA scales s.
        backend: "torch" or "triton" (CUDA tensors, or the CPU interpreter).
    Returns:
        ok (k,) bool: the pairs that were updated; the others (no gradient, or a NaN/inf gradient
        or energy) kept their factors and state.
    """
    if backend == "triton":
        from .kernels.fused_step import fused_bucket_step as impl
    elif backend == "torch":
        impl = _torch_adaprelora_step
    else:
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    return impl(A, B, gradA, gradB, row, col, state, scale, lr, variant=variant, betas=betas, eps=eps,
                weight_decay=weight_decay, momentum=momentum, decay_rate=decay_rate, eps_factored=eps_factored,
                clip_threshold=clip_threshold, damping=damping, rebalance=rebalance)


def _stacked(tensors, present, shape, dtype) -> torch.Tensor:
    """(k, *shape) in `dtype`; zeros for the pairs without a tensor."""
    ref = next(t for t in tensors if t is not None)
    if not all(present):
        tensors = [t if ok else torch.zeros_like(ref) for t, ok in zip(tensors, present)]
    return torch.stack(list(tensors)).view((len(tensors),) + shape).to(dtype)


def _torch_adaprelora_step(A, B, gradA, gradB, row, col, state, scale, lr, *, variant, betas, eps, weight_decay,
                           momentum, decay_rate, eps_factored, clip_threshold, damping, rebalance) -> torch.Tensor:
    k, r, n, m = len(A), A[0].shape[0], A[0][0].numel(), B[0].shape[0]
    cdt = torch.promote_types(A[0].dtype, torch.float32)
    present = [ga is not None and gb is not None for ga, gb in zip(gradA, gradB)]
    A_, B_ = _stacked(A, [True] * k, (r, n), cdt), _stacked(B, [True] * k, (m, r), cdt)
    gA, gB = _stacked(gradA, present, (r, n), cdt), _stacked(gradB, present, (m, r), cdt)
    rows = (row if isinstance(row, torch.Tensor) else torch.stack(list(row))).to(cdt)
    cols = (col if isinstance(col, torch.Tensor) else torch.stack(list(col))).to(cdt)
    inv_s = 1.0 / scale.to(device=A_.device, dtype=cdt).reshape(-1, 1, 1)

    ok = torch.tensor(present, device=A_.device)
    for t in (gA, gB, rows, cols):  # a sum is non-finite iff some element is (or it overflows)
        ok = ok & torch.isfinite(t.sum(tuple(range(1, t.dim()))))
    all_ok = bool(ok.all())
    if not all_ok:  # the pairs left out must not spread a NaN into the batched algebra
        zero = torch.zeros((), dtype=cdt, device=A_.device)
        gA, gB = torch.where(ok[:, None, None], gA, zero), torch.where(ok[:, None, None], gB, zero)
        rows, cols = torch.where(ok[:, None], rows, zero), torch.where(ok[:, None], cols, zero)

    # Adafactor accumulators, the balanced solve, update clipping (spec 3.2 to 3.4)
    step = state["step"] + ok.to(state["step"].dtype)
    R, C, p, q = F.adafactor_accumulators(state["adafactor_row"], state["adafactor_col"], rows, cols,
                                          torch.clamp(step, min=1), decay_rate, eps_factored)
    dA, dB = F.balanced_solve(A_, B_, gA, gB, p, q, damping, inv_s=inv_s)
    if clip_threshold is not None:
        c = F.clip_factor(A_, B_, dA, dB, clip_threshold)[:, None, None]
        dA.mul_(c)
        dB.mul_(c)

    # The factor step (spec 3.5); the pairs left out get their old state back
    skipped = None if all_ok else (~ok).nonzero().flatten()
    saved = None if skipped is None else {name: t[skipped].clone() for name, t in state.items()}
    state["step"].copy_(step)
    state["adafactor_row"].copy_(R)
    state["adafactor_col"].copy_(C)
    F.factor_step_(A_, B_, dA, dB, state, step, variant=variant, lr=lr, betas=betas, eps=eps,
                   weight_decay=weight_decay, momentum=momentum, sgd_scale=inv_s, rebalance_sgd=rebalance)
    if saved is not None:
        for name, value in saved.items():
            state[name][skipped] = value

    # Write the updated pairs back (one foreach copy; casts to the parameters' dtype)
    targets = range(k) if all_ok else ok.nonzero().flatten().tolist()
    if not targets:
        return ok
    A_new, B_new = A_.view((k,) + tuple(A[0].shape)).unbind(0), B_.view((k,) + tuple(B[0].shape)).unbind(0)
    torch._foreach_copy_([A[j] for j in targets] + [B[j] for j in targets],
                         [A_new[j] for j in targets] + [B_new[j] for j in targets])
    return ok


__all__ = ["adaprelora_step"]
