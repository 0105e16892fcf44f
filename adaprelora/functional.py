r"""Pure maths of AdaPreLoRA and the baselines, batched over a bucket of k pairs of equal shape.

Every function takes stacked tensors (A: (k, r, n), B: (k, m, r), gradients alike, p: (k, m),
q: (k, n)) in the compute dtype (float32 or better) and returns new tensors (`adamw_` alone updates
in place); none of them sees parameters, param groups or optimizer state dicts. `docs/algorithm.md` gives the
derivations; the tests check each function against
explicit float64 matrices.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

TINY = torch.finfo(torch.float32).tiny  # smallest normal float32: keeps B = 0 solvable


def _eye_like(M: torch.Tensor) -> torch.Tensor:
    return torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)


def add_ridge(M: torch.Tensor, damping: float) -> torch.Tensor:
    """M + (damping * trace(M) / r + tiny) I for a batch of r x r PSD matrices (project choice)."""
    return add_ridge_(M.clone(), damping)


def add_ridge_(M: torch.Tensor, damping: float) -> torch.Tensor:
    """`add_ridge` in place (M's diagonal); returns M."""
    diag = M.diagonal(dim1=-2, dim2=-1)
    diag.add_(diag.sum(-1, keepdim=True).mul_(damping / M.shape[-1]).add_(TINY))
    return M


def _jittered_cholesky(M: torch.Tensor) -> torch.Tensor:
    """The retry of `cholesky`: M + 1e-6 max|diag M| I, factorised."""
    scale = torch.diagonal(M, dim1=-2, dim2=-1).abs().amax(-1).clamp_min(TINY)
    return torch.linalg.cholesky_ex(M + (1e-6 * scale)[..., None, None] * _eye_like(M))[0]


def cholesky(M: torch.Tensor, *, sync: bool = True) -> torch.Tensor:
    """Batched Cholesky factor; a factor that fails (only for non-finite or wildly scaled input)
    is retried with a larger jitter rather than raising mid-training.

    `sync=True` asks the host whether any factor failed and retries only then; `sync=False` (the
    fused Triton step) computes the retry for every matrix and selects it where needed, so the
    host never waits for the device.
    """
    L, info = torch.linalg.cholesky_ex(M)
    if sync:
        return _jittered_cholesky(M) if bool(info.any()) else L
    return torch.where((info != 0)[..., None, None], _jittered_cholesky(M), L)


ENERGY_EMAS = ("squared", "root")


def adafactor_accumulators(R, C, row, col, step, decay_rate: float = -0.8, eps_factored: float = 1e-30,
                           energy_ema: str = "squared"):
    """`adafactor_accumulators_` on copies of R and C: returns the new (R, C, p, q)."""
    return adafactor_accumulators_(R.clone(), C.clone(), row, col, step, decay_rate, eps_factored, energy_ema)


def adafactor_accumulators_(R, C, row, col, step, decay_rate: float = -0.8, eps_factored: float = 1e-30,
                            energy_ema: str = "squared"):
    r"""Adafactor's factored second moment (spec 3.2), R and C updated in place.

    .. math::
        \beta_{2,t} = 1 - t^{c},\quad R \leftarrow \beta_{2,t} R + (1-\beta_{2,t})(\mathrm{row}/n + \epsilon),
        \quad C \leftarrow \beta_{2,t} C + (1-\beta_{2,t})(\mathrm{col}/m + \epsilon)

    Args: R (k, m), C (k, n), row (k, m), col (k, n) gradient energies, step (k,) the new step t >= 1.
    Returns: (R, C, p, q) with p = sqrt(R / mean(R)), q = sqrt(C), so p_i q_j = sqrt(V_hat_ij), V_hat =
    Adafactor's R C^T / sum(R) in its row/column-sum form (the means here differ by n and m, which cancel).

    `energy_ema="root"` averages after the square root instead (an ablation): R and C hold EMAs of
    sqrt(row / n + eps) and sqrt(col / m + eps), p = R / sqrt(mean(R^2)), q = C; at t = 1 both agree.
    """
    m, n = R.shape[-1], C.shape[-1]
    weight = torch.pow(step.to(R.dtype), decay_rate)[:, None]  # 1 - beta2
    row = torch.mul(row.to(R.dtype), 1.0 / n).add_(eps_factored)
    col = torch.mul(col.to(C.dtype), 1.0 / m).add_(eps_factored)
    if energy_ema == "root":
        R.lerp_(row.sqrt_(), weight)  # beta2 R + (1 - beta2) sqrt(.)
        C.lerp_(col.sqrt_(), weight)
        return R, C, R / torch.sqrt((R * R).mean(-1, keepdim=True)), C
    if energy_ema != "squared":
        raise ValueError(f"energy_ema must be one of {ENERGY_EMAS}, got {energy_ema!r}")
    R.lerp_(row, weight)  # beta2 R + (1 - beta2) row, in one pass
    C.lerp_(col, weight)
    p = torch.div(R, R.mean(-1, keepdim=True)).sqrt_()
    return R, C, p, torch.sqrt(C)


def relative_step_scale(A, B, inv_s, eps: float = 1e-3):
    """Adafactor's relative step size for the weight the rule moves: max(eps, RMS(s B A)) per pair,
    (k,), from the r x r Grams (||B A||^2 = <B^T B, A A^T>) without forming B A. The LoRA delta
    starts at zero, so the step starts at lr * eps and grows with the adapter, as Adafactor's does
    for a zero-initialised tensor. inv_s (k, 1, 1) is 1/s."""
    m, n = B.shape[-2], A.shape[-1]
    sq = ((B.mT @ B) * (A @ A.mT)).sum((-2, -1)).clamp_min(0)
    rms = torch.sqrt(sq / (m * n)) / inv_s.reshape(-1).abs()
    return torch.clamp(rms, min=eps)


def cholesky_inverse(M: torch.Tensor) -> torch.Tensor:
    """Inverses of a batch of SPD r x r matrices through one batched Cholesky factorisation; the
    wide products are then plain bmm, which runs far faster than triangular solves with n columns."""
    return torch.cholesky_inverse(cholesky(M))


def balanced_solve(A, B, gA, gB, p, q, damping: float = 0.1, inv_s=None):
    r"""AdaPreLoRA's closed-form balanced factor step (spec 3.3).

    .. math::
        M_B = B^\top P B + \lambda_B I,\quad M_A = A Q A^\top + \lambda_A I,\quad K = g_A A^\top \\
        dA = M_B^{-1}\big(g_A Q^{-1} - \tfrac12 K M_A^{-1} A\big),\quad
        dB = \big(P^{-1} g_B - \tfrac12 B M_B^{-1} K\big) M_A^{-1}

    computed as dA = M_B^{-1} (g_A Q^{-1}) - Y A and dB = (P^{-1} g_B) M_A^{-1} - B Y with
    Y = 1/2 M_B^{-1} K M_A^{-1}. Delta = B dA + dB A solves the normal equations
    B^T P Delta Q = gA, P Delta Q A^T = gB (as the ridge goes to 0) and is the element of the
    solution family with the least H-weighted imbalance. gA, gB are the gradients of W_eff's
    factors without the LoRA scale s; pass the raw `.grad`s with `inv_s` = 1/s, (k, 1, 1), to
    fold the division into passes made anyway.
    """
    MB_inv = cholesky_inverse(add_ridge(B.mT @ (B * p[..., :, None]), damping))
    MA_inv = cholesky_inverse(add_ridge((A * q[..., None, :]) @ A.mT, damping))
    K = gA @ A.mT
    scale_A, scale_B = 1.0 / q[..., None, :], 1.0 / p[..., :, None]
    if inv_s is not None:
        K = K * inv_s
        scale_A, scale_B = scale_A * inv_s, scale_B * inv_s
    Y = 0.5 * (MB_inv @ K @ MA_inv)
    dA = torch.baddbmm(MB_inv @ (gA * scale_A), Y, A, alpha=-1) if A.dim() == 3 else MB_inv @ (gA * scale_A) - Y @ A
    dB = torch.baddbmm((gB * scale_B) @ MA_inv, B, Y, alpha=-1) if B.dim() == 3 else (gB * scale_B) @ MA_inv - B @ Y
    return dA, dB


def _tangent_parts(A, B, gA, gB, damping):
    """W = (B^T B)^{-1}(gA - K (AA^T)^{-1} A) and U2 = gB (AA^T)^{-1}, both ridged: G_T = B W + U2 A."""
    AAt = A @ A.mT
    MB_inv = cholesky_inverse(add_ridge(B.mT @ B, damping))
    MA_inv = cholesky_inverse(add_ridge(AAt, damping))
    K = gA @ A.mT
    W = torch.baddbmm(MB_inv @ gA, MB_inv @ K @ MA_inv, A, alpha=-1) if A.dim() == 3 else MB_inv @ gA - MB_inv @ K @ MA_inv @ A
    return W, gB @ MA_inv, AAt


def tangent_factors(A, B, gA, gB, damping: float = 0.1):
    r"""G_T = P_B G + G P_A - P_B G P_A (Frobenius projection of G on the tangent space at (B, A))
    written as U V^T with U = [B, gB (AA^T)^{-1}] (m x 2r) and V = [W^T, A^T] (n x 2r), where
    W = (B^T B)^{-1} (gA - K (AA^T)^{-1} A). Only gA = B^T G and gB = G A^T are needed."""
    W, U2, _ = _tangent_parts(A, B, gA, gB, damping)
    return torch.cat([B, U2], dim=-1), torch.cat([W.mT, A.mT], dim=-1)


def tangent_energies(A, B, gA, gB, damping: float = 0.1):
    """Row (k, m) and column (k, n) energies of the tangent projection G_T = U V^T, in O((m+n) r^2)
    without forming G_T (spec 3.1, `stats="tangent"`): row = rowsum((U V^T V) * U) and
    col = rowsum((V U^T U) * V), with the 2r x 2r Grams kept as r x r blocks (no concatenation)."""
    W, U2, AAt = _tangent_parts(A, B, gA, gB, damping)
    Wt, At = W.mT, A.mT
    S11, S12 = W @ Wt, W @ At  # V^T V = [[S11, S12], [S12^T, AAt]]
    T11, T12, T22 = B.mT @ B, B.mT @ U2, U2.mT @ U2  # U^T U = [[T11, T12], [T12^T, T22]]
    row = ((B @ S11 + U2 @ S12.mT) * B).sum(-1) + ((B @ S12 + U2 @ AAt) * U2).sum(-1)
    col = ((Wt @ T11 + At @ T12.mT) * Wt).sum(-1) + ((Wt @ T12 + At @ T22) * At).sum(-1)
    return row.clamp_min(0), col.clamp_min(0)


def lowrank_energies(U, V):
    """Row and column energies of U V^T from its factors U (k, m, w) and V (k, n, w), in
    O((m+n) w^2) without forming the product: row = rowsum((U V^T V) * U), col = rowsum((V U^T U) * V)."""
    row = ((U @ (V.mT @ V)) * U).sum(-1)
    col = ((V @ (U.mT @ U)) * V).sum(-1)
    return row.clamp_min(0), col.clamp_min(0)


def raw_surrogate_energies(A, B, gA, gB):
    """Row (k, m) and column (k, n) energies of the raw surrogate gB A + B gA = [gB, B] [A^T, gA^T]^T
    (`stats="raw"`, the paper's surrogate of G; unlike the tangent projection it changes when the
    factors are rescaled (B, A) -> (cB, A/c))."""
    return lowrank_energies(torch.cat([gB, B], dim=-1), torch.cat([A.mT, gA.mT], dim=-1))


def delta_sq_norm(A, B, dA, dB):
    """||B dA + dB A||_F^2 per pair from r x r products only (spec 3.4)."""
    t1 = ((B.mT @ B) * (dA @ dA.mT)).sum((-2, -1))
    t2 = ((B.mT @ dB) * (dA @ A.mT)).sum((-2, -1))
    t3 = ((dB.mT @ dB) * (A @ A.mT)).sum((-2, -1))
    return (t1 + 2 * t2 + t3).clamp_min(0)


def clip_factor(A, B, dA, dB, clip_threshold):
    """Adafactor's update clipping: a (k,) factor min(1, clip / RMS(Delta)); ones when disabled."""
    k, m, n = A.shape[0], B.shape[-2], A.shape[-1]
    if clip_threshold is None:
        return torch.ones(k, dtype=A.dtype, device=A.device)
    rms = torch.sqrt(delta_sq_norm(A, B, dA, dB) / (m * n))
    return clip_threshold / torch.clamp(rms, min=clip_threshold)


def scaled_gradients(A, B, gradA, gradB, reg: float):
    r"""Riemannian preconditioned LoRA (Zhang and Pilanci 2024):
    gA <- (B^T B + reg I)^{-1} gA,  gB <- gB (A A^T + reg I)^{-1}."""
    eye = _eye_like(B.mT @ B)
    LB = cholesky(B.mT @ B + reg * eye)
    LA = cholesky(A @ A.mT + reg * eye)
    return torch.cholesky_solve(gradA, LB), torch.cholesky_solve(gradB.mT, LA).mT


def sym_sylvester(S1, S2, rhs, reg: float = 0.0):
    r"""Solve S1 X + X S2 = rhs for symmetric PSD S1, S2 (batched) with real eigendecompositions:
    X = U1 [(U1^T rhs U2) / (l1_i + l2_j)] U2^T. No complex eig, no Kronecker system."""
    l1, U1 = torch.linalg.eigh(S1)
    l2, U2 = torch.linalg.eigh(S2)
    denom = (l1[..., :, None] + l2[..., None, :]).clamp_min(0) + reg + TINY
    return U1 @ ((U1.mT @ rhs @ U2) / denom) @ U2.mT


def lora_pro_gradients(A, B, gradA, gradB, s, reg: float = 1e-6):
    r"""LoRA-Pro (Wang et al. 2025), efficient mode: the factor gradients whose equivalent
    gradient s (B gA + gB A) is the Frobenius projection of the full gradient G,

    .. math::
        g_A = s^{-2} (B^\top B)^{-1} \nabla_A + X A,\quad
        g_B = s^{-2} (I - B (B^\top B)^{-1} B^\top) \nabla_B (A A^\top)^{-1} - B X,

    with X the minimiser of the distance to the plain LoRA gradients, the solution of the
    Sylvester equation B^T B X + X A A^T = -s^{-2} (B^T B)^{-1} \nabla_A A^T. `s` is (k, 1, 1).
    """
    eye = _eye_like(B.mT @ B)
    BtB = B.mT @ B
    AAt = A @ A.mT
    LB = cholesky(BtB + reg * eye)
    LA = cholesky(AAt + reg * eye)
    inv_s2 = 1.0 / (s * s)
    gA_base = inv_s2 * torch.cholesky_solve(gradA, LB)
    proj = gradB - B @ torch.cholesky_solve(B.mT @ gradB, LB)
    gB_base = inv_s2 * torch.cholesky_solve(proj.mT, LA).mT
    X = sym_sylvester(BtB, AAt, -inv_s2 * torch.cholesky_solve(gradA @ A.mT, LB), reg)
    return gA_base + X @ A, gB_base - B @ X


def fused_adamw_ok(tensor: torch.Tensor) -> bool:
    """torch's fused AdamW kernel (`torch.optim.AdamW(fused=True)`'s) takes tensors like this one."""
    return (hasattr(torch, "_fused_adamw_") and tensor.device.type in ("cpu", "cuda")
            and tensor.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16))


def adamw_tensors_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step (torch.optim.AdamW's formula) on lists of equal-dtype contiguous tensors, in
    place, with torch's fused kernel: one pass per tensor instead of one per operation, and the
    parameters can be the model's own tensors, so a stacked step needs no copy back. `steps` are
    0-dim tensors, already incremented (pairs may have different counts)."""
    if not params:
        return
    torch._fused_adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), [], list(steps),
                        lr=float(lr), beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False,
                        maximize=False)


def adamw_(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step (torch.optim.AdamW's formula) on stacked tensors, in place. `step` is (k,),
    already incremented, so pairs may have different counts. Rows of contiguous tensors go through
    the fused kernel (`adamw_tensors_`); `adamw_formula_` is the fallback elsewhere (other
    devices, non-contiguous rows), with the same result up to rounding."""
    if fused_adamw_ok(param) and all(t.dtype == param.dtype for t in (grad, exp_avg, exp_avg_sq, step)) and all(
            t[0].is_contiguous() for t in (param, grad, exp_avg, exp_avg_sq)):
        adamw_tensors_(param.unbind(0), grad.unbind(0), exp_avg.unbind(0), exp_avg_sq.unbind(0), step.unbind(0),
                       lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    else:
        adamw_formula_(param, grad, exp_avg, exp_avg_sq, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay)


def adamw_formula_(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay):
    """`adamw_` written out in tensor operations: the fallback of the fused kernel, and the
    reference the Triton kernels are checked against (the same operation order as theirs)."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if lr == 0:
        return
    t = step.to(param.dtype).reshape((-1,) + (1,) * (param.dim() - 1))
    bc1, sqrt_bc2 = 1 - beta1 ** t, torch.sqrt(1 - beta2 ** t)
    # param -= (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps), the per-pair factors folded into one
    # pass over the denominator: sqrt(v) bc1 / (lr sqrt(bc2)) + eps bc1 / lr
    denom = exp_avg_sq.sqrt()
    torch.addcmul(eps * bc1 / lr, denom, bc1 / (lr * sqrt_bc2), out=denom)
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    param.addcdiv_(exp_avg, denom, value=-1)


def adamw_update(param, grad, exp_avg, exp_avg_sq, step, **hyper):
    """Out-of-place `adamw_formula_`: returns the new (param, exp_avg, exp_avg_sq)."""
    param, exp_avg, exp_avg_sq = param.clone(), exp_avg.clone(), exp_avg_sq.clone()
    adamw_formula_(param, grad, exp_avg, exp_avg_sq, step, **hyper)
    return param, exp_avg, exp_avg_sq


def solve_from_grams(grams, mean_r, m, n, damping, clip_threshold):
    """(c M_B^-1, c Y, c M_A^-1) for every pair, c the clip factor, from the fused step's Grams
    (k, 9, r, r): B^T S B, B^T B, B^T S^-1 gB, gB^T S^-2 gB, A Q A^T, A A^T, gA A^T, gA Q^-1 A^T,
    gA Q^-2 gA^T (S = diag sqrt(R), Q = diag sqrt(C), so P = S / sqrt(mean R)), without a host
    sync (see kernels/fused_step.py)."""
    G1, G2, G3, G4, H1, H2, K, H3, H4 = grams.unbind(1)
    sq_mr = torch.sqrt(mean_r)[:, None, None]
    HA = torch.cat([torch.cat([H2, H3.mT], -1), torch.cat([H3, H4], -1)], -2)
    GB = torch.cat([torch.cat([G2, G3 * sq_mr], -1), torch.cat([G3.mT * sq_mr, G4 * (sq_mr * sq_mr)], -1)], -2)
    return solve_rxr(G1 / sq_mr, H1, K, HA, GB, m, n, damping, clip_threshold, sync=False)


def solve_rxr(BPB, AQA, K, HA, GB, m, n, damping, clip_threshold, *, sync=True):
    """`balanced_solve` and `clip_factor` in r x r algebra only: (c M_B^-1, c Y, c M_A^-1) with
    Y = 1/2 M_B^-1 K M_A^-1 and c the clip factor, so that dA = [-c Y, c M_B^-1] [A; gAq] and
    dB = [B, gBp] [-c Y; c M_A^-1] (gAq = gA Q^-1, gBp = P^-1 gB).

    From B^T P B, A Q A^T, K = gA A^T and the 2r x 2r Grams HA of [A; gAq] (rows) and GB of
    [B, gBp] (columns): B dA + dB A = [B, gBp] Z [A; gAq] with Z = [[-2Y, M_B^-1], [M_A^-1, 0]],
    so ||B dA + dB A||^2 = tr(Z^T GB Z HA), two 2r x 2r products per pair. `sync=False` never
    asks the host whether a Cholesky factor failed (see `cholesky`)."""
    k = K.shape[0]
    L = cholesky(add_ridge_(torch.cat([BPB, AQA]), damping), sync=sync)  # M_B, M_A + ridge, one batch
    Minv = torch.cholesky_inverse(L)
    MBi, MAi = Minv.narrow(0, 0, k), Minv.narrow(0, k, k)
    Y2 = torch.bmm(torch.bmm(MBi, K), MAi)  # 2 Y
    if clip_threshold is None:
        return MBi, Y2.mul_(0.5), MAi
    # tr(Z^T GB Z HA) = sum((GB Z) * (Z HA)), GB and HA being symmetric
    Z = torch.cat([torch.cat([Y2.neg(), MBi], -1), torch.cat([MAi, torch.zeros_like(MAi)], -1)], -2)
    sq = (torch.bmm(GB, Z) * torch.bmm(Z, HA)).sum((-2, -1))
    # c = clip / max(RMS(Delta), clip), RMS = sqrt(sq / (m n)), in two passes over (k,)
    c = torch.rsqrt(sq.clamp_(min=clip_threshold ** 2 * m * n)).mul_(clip_threshold * math.sqrt(m * n)).view(-1, 1, 1)
    return MBi * c, Y2.mul_(c).mul_(0.5), MAi * c


class BalancedGrams(NamedTuple):
    """The r x r products of a stacked bucket that AdaPreLoRA's step needs (`balanced_grams_`)."""

    BPB: torch.Tensor  # B^T P B
    AQA: torch.Tensor  # A Q A^T
    K: torch.Tensor  # gA A^T / s
    HA: torch.Tensor  # the 2r x 2r Gram of [A; gAq] (rows)
    GB: torch.Tensor  # the 2r x 2r Gram of [B, gBp] (columns)

    def finite(self) -> torch.Tensor:
        """(k,) True where the pair's gradients are finite: tr(gAq gAq^T) + tr(gBp^T gBp) is their
        squared norm, non-finite iff an element is (or they overflow, no usable gradient either)."""
        r = self.K.shape[-1]
        sq = self.HA.diagonal(0, -2, -1).narrow(-1, r, r).sum(-1)
        return torch.isfinite(sq.add_(self.GB.diagonal(0, -2, -1).narrow(-1, r, r).sum(-1)))


def balanced_grams_(XA, XB, p, q, inv_s) -> BalancedGrams:
    """The r x r products of `balanced_step_`, from batched products with few passes over the
    factors: the Gram of [A; gAq] from its three distinct blocks, [A; gAq] against A Q, the Grams of
    B and of gBp in one batch, B^T gBp, B^T P B. Overwrites the gradient halves of XA (k, 2r, n)
    and XB (k, 2, m, r) with gAq = gA Q^-1 / s and gBp = P^-1 gB / s."""
    k, r2, n = XA.shape
    r = r2 // 2
    # narrow / select / unsqueeze rather than x[:, :r]-style indexing: one dispatch each (small-op overhead)
    A, gA = XA.narrow(1, 0, r), XA.narrow(1, r, r)
    B, gB = XB.select(1, 0), XB.select(1, 1)
    q_row, p_col = q.unsqueeze(1), p.unsqueeze(2)
    gA.mul_(inv_s / q_row)
    gB.mul_(inv_s / p_col)
    AAt = torch.bmm(XA, A.mT)  # [A A^T; gAq A^T]
    H1K = torch.bmm(XA, (A * q_row).mT)  # [A Q A^T; gA A^T]
    H2, H3 = AAt.narrow(1, 0, r), AAt.narrow(1, r, r)
    HA = torch.cat([torch.cat([H2, H3.mT], -1), torch.cat([H3, torch.bmm(gA, gA.mT)], -1)], -2)
    XB2 = XB.flatten(0, 1)
    G24 = torch.bmm(XB2.mT, XB2).view(k, 2, r, r)  # B^T B, gBp^T gBp
    G3 = torch.bmm(B.mT, gB)  # B^T gBp
    GB = torch.cat([torch.cat([G24.select(1, 0), G3], -1), torch.cat([G3.mT, G24.select(1, 1)], -1)], -2)
    BPB = torch.bmm(B.mT, B * p_col)
    return BalancedGrams(BPB, H1K.narrow(1, 0, r), H1K.narrow(1, r, r), HA, GB)


def balanced_directions(XA, XB, grams: BalancedGrams, damping: float = 0.1, clip_threshold=1.0):
    """The clipped (dA, dB) of `balanced_step_` from its Grams (`balanced_grams_`, whose scaled
    gradients XA and XB hold): dA = [-c Y, c M_B^-1] [A; gAq] and dB = gBp c M_A^-1 - B c Y."""
    m, n = XB.shape[-2], XA.shape[-1]
    MBi, Y, MAi = solve_rxr(*grams, m, n, damping, clip_threshold)
    dA = torch.bmm(torch.cat([Y.neg(), MBi], -1), XA)
    dB = torch.bmm(XB.select(1, 1), MAi).baddbmm_(XB.select(1, 0), Y, alpha=-1)
    return dA, dB


def balanced_step_(XA, XB, p, q, inv_s, damping: float = 0.1, clip_threshold=1.0):
    r"""`balanced_solve` then `clip_factor` (spec 3.3, 3.4) on a stacked bucket, with few passes
    over factor-sized data: the torch implementation of AdaPreLoRA's step.

    XA (k, 2r, n) holds [A; grad A] and XB (k, 2, m, r) holds [B, grad B] per pair (the layout
    `step._stack_pairs` makes); the gradient halves are overwritten with gA Q^-1 / s and
    P^-1 gB / s. The r x r products come from batched products (`balanced_grams_`), the clip
    factor from r x r algebra (`solve_rxr`), and then dA = [-c Y, c M_B^-1] [A; gAq] and
    dB = gBp c M_A^-1 - B c Y (`balanced_directions`). p (k, m), q (k, n), inv_s (k, 1, 1).
    Returns the clipped (dA, dB).
    """
    return balanced_directions(XA, XB, balanced_grams_(XA, XB, p, q, inv_s), damping, clip_threshold)


def gradient_ema_(ema_A, ema_B, gA, gB, step, beta: float) -> None:
    """Momentum before the solve (`momentum_before_solve`): EMAs of the factor gradients with
    weight 1 - beta, then gA, gB overwritten with their bias-corrected values (step (k,) is the
    new count), Adafactor-with-momentum style: the solve then sees the averaged gradients."""
    ema_A.lerp_(gA, 1 - beta)
    ema_B.lerp_(gB, 1 - beta)
    correction = (1 - beta ** step.to(ema_A.dtype))[:, None, None]
    torch.div(ema_A, correction, out=gA) if gA.is_contiguous() else gA.copy_(ema_A / correction)
    torch.div(ema_B, correction, out=gB) if gB.is_contiguous() else gB.copy_(ema_B / correction)


def factor_step_(A, B, dA, dB, state, step, *, variant, lr, betas, eps, weight_decay, momentum=0.0,
                 sgd_scale=None, rebalance_sgd=False, lr_B=None, lr_scale=None, params=None) -> bool:
    """Move stacked factors A, B along directions dA, dB in place, with the bucket's `state`.

    "adamw": AdamW on each factor (moments "exp_avg_A", "exp_avg_sq_A", "exp_avg_B", "exp_avg_sq_B").
    "sgd": A -= lr sgd_scale dA (likewise B) after decoupled weight decay, with heavy-ball momentum
    ("momentum_buffer_A/B") when `momentum`, then, with `rebalance_sgd`, B c, A / c (`rebalance`;
    momentum buffers and gradient EMAs "grad_ema_A/B" follow the new coordinates).
    `step` (k,) is the new step count; `sgd_scale` (k, 1, 1), ones when None; `lr_B` is B's
    learning rate when it differs from A's (B in its own param group), else None. `lr_scale`
    (k, 1, 1), "sgd" only: per-pair factors on both learning rates, weight decay included (the
    relative step size, `relative_step_scale`).
    `params`, "adamw" only: (rows, A tensors, B tensors, views), the tensors whose current values A and
    B's rows `rows` hold (the parameters, in the compute dtype and contiguous): AdamW then moves those
    tensors and their moments' rows directly, and A, B are left as they were; `views` (a dict kept
    with `state`, or None) caches the per-pair views of the state (`_per_pair`). Returns True when it
    moved `params`, False when it moved A and B.
    """
    lr_B = lr if lr_B is None else lr_B
    if lr_scale is not None:
        if variant != "sgd":
            raise ValueError("lr_scale applies to variant='sgd' only")
        lr, lr_B = lr * lr_scale, lr_B * lr_scale
    if variant == "adamw":
        b1, b2 = betas
        hyper = dict(beta1=b1, beta2=b2, eps=eps, weight_decay=weight_decay)
        if params is not None:
            rows, PA, PB, views = params
            every = len(rows) == len(PA)  # all pairs: the lists as they are
            steps = _per_pair(step, step.shape[1:], views)
            steps = steps if every else [steps[j] for j in rows]
            for P, d, name, rate in ((PA, dA, "A", lr), (PB, dB, "B", lr_B)):
                shape = P[0].shape  # a conv factor's rows take its own shape
                rows_of = [_per_pair(t, shape, v) for t, v in ((d, None), (state["exp_avg_" + name], views),
                                                               (state["exp_avg_sq_" + name], views))]
                if not every:
                    P, rows_of = [P[j] for j in rows], [[t[j] for j in rows] for t in rows_of]
                adamw_tensors_(P, *rows_of, steps, lr=rate, **hyper)
            return True
        adamw_(A, dA, state["exp_avg_A"], state["exp_avg_sq_A"], step, lr=lr, **hyper)
        adamw_(B, dB, state["exp_avg_B"], state["exp_avg_sq_B"], step, lr=lr_B, **hyper)
        return False
    if momentum:
        first = (step <= 1)[:, None, None]
        for d, name in ((dA, "momentum_buffer_A"), (dB, "momentum_buffer_B")):
            buf = state[name]
            buf.copy_(torch.where(first, d, buf.mul_(momentum).add_(d)))
        dA, dB = state["momentum_buffer_A"], state["momentum_buffer_B"]
    for x, d, rate in ((A, dA, lr), (B, dB, lr_B)):
        if weight_decay:
            x.mul_(1 - rate * weight_decay)
        x.sub_((rate if sgd_scale is None else rate * sgd_scale) * d)
    if rebalance_sgd:
        c = rebalance(A, B)[:, None, None]
        A.div_(c)
        B.mul_(c)
        if momentum:  # keep the buffers in the rebalanced coordinates (dA -> dA / c, dB -> dB c)
            state["momentum_buffer_A"].div_(c)
            state["momentum_buffer_B"].mul_(c)
        if "grad_ema_A" in state:  # gradients transform the other way (gA -> c gA, gB -> gB / c)
            state["grad_ema_A"].mul_(c)
            state["grad_ema_B"].div_(c)
    return False


def _per_pair(t: torch.Tensor, shape, views=None) -> tuple:
    """The rows of a stacked (k, ...) tensor as k contiguous views of `shape`. With `views` (a
    dict kept between steps) the views of a contiguous tensor are made once and reused: making k
    views costs about a microsecond each, every step."""
    hit = None if views is None else views.get(id(t))
    if hit is not None and hit[0] is t and hit[1] == shape:
        return hit[2]
    rows = (t if t.shape[1:] == shape else t.reshape((t.shape[0],) + shape)).contiguous().unbind(0)
    if views is not None and t.is_contiguous():
        views[id(t)] = (t, shape, rows)
    return rows


def rebalance(A, B):
    """c = sqrt(||A|| / ||B||) per pair (ones where either is zero): B c, A / c leave B A unchanged."""
    return rebalance_from_norms(torch.linalg.vector_norm(A.flatten(1), dim=1),
                                torch.linalg.vector_norm(B.flatten(1), dim=1))


def rebalance_from_norms(na, nb, ok=None):
    """`rebalance`'s factor from the (k,) norms ||A||, ||B||; ones where either is zero or `ok` is False."""
    good = (na > 0) & (nb > 0)
    if ok is not None:
        good = good & ok
    return torch.where(good, torch.sqrt(na / torch.where(good, nb, torch.ones_like(nb))), torch.ones_like(na))
