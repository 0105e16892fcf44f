"""
Fused multi-pair AdaPreLoRA step
================================

You will learn about:

* stepping a whole bucket of LoRA pairs (equal m, n, r, dtype) in three launches and a handful of
  batched r x r torch ops, with no host synchronisation and no Python branch on tensor values;
* pointer tables: one int64 tensor of addresses per operand, so parameters and gradients that live
  in separate allocations are read in place, never stacked into a copy;
* folding Adafactor's update clipping into r x r algebra, so the factor directions are formed once.
"""

# %%
# Motivations
# -----------
#
# The torch path (`adaprelora.step._torch_adaprelora_step`) stacks each bucket, then runs ~40
# small kernels per bucket, and syncs the host on the finiteness checks.  LoRA factors are tiny
# (SD 1.5 attention, r = 16: 128 pairs of at most 1280 x 16), so that step is launch- and
# sync-bound.  Per bucket of k pairs, the memory traffic of one step is (T = r (m + n) per pair):
#
#   phase (a) `_bucket_grams_kernel`   read A, B, gA, gB, R, C, row, col   ~4 k T        write 10 k r^2
#   phase (b) torch, batched r x r     Cholesky, inverses, clip factor    O(k r^3)       no sync
#   phase (c) `_bucket_apply_kernel`   read A, B, gA, gB, moments, R, C   ~6 k T        write A, B,
#                                      moments, R, C                      ~5 k T
#   (sgd only) phase (d) `_bucket_rescale_kernel`  the rebalancing B c, A / c, momentum alike
#
# against ~7 k T for torch.optim.AdamW(fused=True).  Everything r x r comes from phase (a)'s Grams:
#
#   B side (over m):  G1 = B^T S B, G2 = B^T B, G3 = B^T S^-1 gB, G4 = gB^T S^-2 gB   (S = diag sqrt(R_new))
#   A side (over n):  H1 = A Q A^T, H2 = A A^T, K = gA A^T, H3 = gA Q^-1 A^T, H4 = gA Q^-2 gA^T
#
# With p = sqrt(R / mean R) = S / sqrt(mR):  M_B = G1 / sqrt(mR) + ridge,  M_A = H1 + ridge, and
#
#   dA = c (M_B^-1 (gA Q^-1) - Y A),   dB = c ((P^-1 gB) M_A^-1 - B Y),   Y = 1/2 M_B^-1 K M_A^-1,
#
# where c is the clip factor.  ||B dA + dB A||^2 expands into the same Grams (see `_clip_factor`),
# so c is known before phase (c) forms dA and dB tile by tile.  Pairs with a non-finite gradient or
# energy are detected in phase (a) (x - x != 0) and left untouched by masked stores (`ok`).

import os
from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from ..functional import rebalance_from_norms, solve_from_grams

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# %%
# Compute Kernels
# ---------------


@triton.jit
def _bucket_grams_kernel(
    # Pointer tables (int64 addresses, one per pair): parameters, gradients, energies
    a_tab, b_tab, ga_tab, gb_tab, row_tab, col_tab,
    # Stacked fp32 accumulators (k, M), (k, N) and per-pair vectors (k,)
    R_ptr, C_ptr, beta2_ptr, inv_s_ptr,
    # Outputs: R_new (k, M), C_new (k, N); Grams (k, 9, R_PAD, R_PAD); stats (k, 3): sum R_new,
    # B-side and A-side finiteness (0, or NaN when a NaN/inf was read)
    R_new_ptr, C_new_ptr, grams_ptr, stats_ptr,
    # Dimensions
    M, N, RANK,
    eps_factored,
    # Meta-parameters
    PARAM_DTYPE: tl.constexpr, R_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (pair, side): side 0 walks the m rows (B, gB, R), side 1 the n columns (A, gA, C)."""
    pid = tl.program_id(0)
    side = tl.program_id(1)
    beta2 = tl.load(beta2_ptr + pid)
    inv_s = tl.load(inv_s_ptr + pid)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < RANK
    offs = tl.arange(0, BLOCK)
    g_out = grams_ptr + pid * 9 * R_PAD * R_PAD + offs_r[:, None] * R_PAD + offs_r[None, :]
    acc0 = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    acc1 = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    acc2 = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    acc3 = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    acc4 = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    total = tl.zeros((BLOCK,), dtype=tl.float32)  # sum of R_new (side 0)
    bad = tl.zeros((BLOCK,), dtype=tl.float32)  # stays 0 unless a NaN/inf was read
    if side == 0:
        b_base = tl.load(b_tab + pid).to(tl.pointer_type(PARAM_DTYPE))
        gb_base = tl.load(gb_tab + pid).to(tl.pointer_type(PARAM_DTYPE))
        row_base = tl.load(row_tab + pid).to(tl.pointer_type(tl.float32))
        for m0 in range(0, M, BLOCK):
            offs_m = m0 + offs
            mask_m = offs_m < M
            mask = mask_m[:, None] & mask_r[None, :]
            idx = offs_m[:, None] * RANK + offs_r[None, :]
            b = tl.load(b_base + idx, mask=mask, other=0.0).to(tl.float32)
            gb = tl.load(gb_base + idx, mask=mask, other=0.0).to(tl.float32) * inv_s
            energy = tl.load(row_base + offs_m, mask=mask_m, other=0.0)
            r_old = tl.load(R_ptr + pid * M + offs_m, mask=mask_m, other=0.0)
            r_new = tl.where(mask_m, beta2 * r_old + (1 - beta2) * (energy / N + eps_factored), 0.0)
            tl.store(R_new_ptr + pid * M + offs_m, r_new, mask=mask_m)
            sr = tl.sqrt(r_new)
            inv_sr = tl.where(mask_m, 1.0 / tl.where(mask_m, sr, 1.0), 0.0)
            gbs = gb * inv_sr[:, None]
            acc0 = tl.dot(tl.trans(b * sr[:, None]), b, acc0, input_precision="ieee")  # B^T S B
            acc1 = tl.dot(tl.trans(b), b, acc1, input_precision="ieee")  # B^T B
            acc2 = tl.dot(tl.trans(b), gbs, acc2, input_precision="ieee")  # B^T S^-1 gB
            acc3 = tl.dot(tl.trans(gbs), gbs, acc3, input_precision="ieee")  # gB^T S^-2 gB
            total += r_new
            bad += tl.sum(gb - gb, axis=1) + (energy - energy)
        tl.store(g_out, acc0)
        tl.store(g_out + R_PAD * R_PAD, acc1)
        tl.store(g_out + 2 * R_PAD * R_PAD, acc2)
        tl.store(g_out + 3 * R_PAD * R_PAD, acc3)
        tl.store(stats_ptr + pid * 3, tl.sum(total, axis=0))
        tl.store(stats_ptr + pid * 3 + 1, tl.sum(bad, axis=0))
    else:
        a_base = tl.load(a_tab + pid).to(tl.pointer_type(PARAM_DTYPE))
        ga_base = tl.load(ga_tab + pid).to(tl.pointer_type(PARAM_DTYPE))
        col_base = tl.load(col_tab + pid).to(tl.pointer_type(tl.float32))
        for n0 in range(0, N, BLOCK):
            offs_n = n0 + offs
            mask_n = offs_n < N
            mask = mask_r[:, None] & mask_n[None, :]
            idx = offs_r[:, None] * N + offs_n[None, :]
            a = tl.load(a_base + idx, mask=mask, other=0.0).to(tl.float32)
            ga = tl.load(ga_base + idx, mask=mask, other=0.0).to(tl.float32) * inv_s
            energy = tl.load(col_base + offs_n, mask=mask_n, other=0.0)
            c_old = tl.load(C_ptr + pid * N + offs_n, mask=mask_n, other=0.0)
            c_new = tl.where(mask_n, beta2 * c_old + (1 - beta2) * (energy / M + eps_factored), 0.0)
            tl.store(C_new_ptr + pid * N + offs_n, c_new, mask=mask_n)
            q = tl.sqrt(c_new)
            gaq = ga * tl.where(mask_n, 1.0 / tl.where(mask_n, q, 1.0), 0.0)[None, :]
            acc0 = tl.dot(a * q[None, :], tl.trans(a), acc0, input_precision="ieee")  # A Q A^T
            acc1 = tl.dot(a, tl.trans(a), acc1, input_precision="ieee")  # A A^T
            acc2 = tl.dot(ga, tl.trans(a), acc2, input_precision="ieee")  # K = gA A^T
            acc3 = tl.dot(gaq, tl.trans(a), acc3, input_precision="ieee")  # gA Q^-1 A^T
            acc4 = tl.dot(gaq, tl.trans(gaq), acc4, input_precision="ieee")  # gA Q^-2 gA^T
            bad += tl.sum(ga - ga, axis=0) + (energy - energy)
        tl.store(g_out + 4 * R_PAD * R_PAD, acc0)
        tl.store(g_out + 5 * R_PAD * R_PAD, acc1)
        tl.store(g_out + 6 * R_PAD * R_PAD, acc2)
        tl.store(g_out + 7 * R_PAD * R_PAD, acc3)
        tl.store(g_out + 8 * R_PAD * R_PAD, acc4)
        tl.store(stats_ptr + pid * 3 + 2, tl.sum(bad, axis=0))


@triton.jit
def _update(p, d, m1_ptrs, m2_ptrs, mask, first, step_size, sqrt_bc2, wd_mult,
            beta1, beta2, eps, momentum, VARIANT: tl.constexpr):
    """New parameter value from direction d; AdamW moments or the momentum buffer updated in place.
    VARIANT 0: AdamW.  1: SGD.  2: SGD with heavy-ball momentum."""
    if VARIANT == 0:
        m1 = tl.load(m1_ptrs, mask=mask, other=0.0)
        m2 = tl.load(m2_ptrs, mask=mask, other=0.0)
        m1 = m1 + (1 - beta1) * (d - m1)  # torch.lerp(exp_avg, d, 1 - beta1)
        m2 = m2 * beta2 + (1 - beta2) * d * d
        tl.store(m1_ptrs, m1, mask=mask)
        tl.store(m2_ptrs, m2, mask=mask)
        denom = tl.sqrt(m2) / sqrt_bc2 + eps
        p = p * wd_mult - step_size * m1 / denom
    else:
        if VARIANT == 2:
            buf = tl.load(m1_ptrs, mask=mask, other=0.0)
            d = tl.where(first, d, momentum * buf + d)
            tl.store(m1_ptrs, d, mask=mask)
        p = p * wd_mult - step_size * d
    return p


@triton.jit
def _bucket_apply_kernel(
    # Pointer tables: parameters and gradients
    a_tab, b_tab, ga_tab, gb_tab,
    # Stacked fp32: new accumulators (from phase a) and optimizer moments (k, ...)
    R_new_ptr, C_new_ptr, m1a_ptr, m2a_ptr, m1b_ptr, m2b_ptr,
    # Per pair: r x r matrices (k, 3, R_PAD, R_PAD) = c M_B^-1, c Y, c M_A^-1; vectors (k, 9)
    mats_ptr, vec_ptr,
    # Output: squared norms of the new A and B per tile (k, tiles), for the sgd rebalancing
    norms_ptr,
    # Dimensions
    M, N, RANK,
    # Hyper-parameters
    beta1, beta2, eps, momentum,
    # Meta-parameters
    PARAM_DTYPE: tl.constexpr, VARIANT: tl.constexpr, R_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (pair, tile): tiles [0, cdiv(N, BLOCK)) are column blocks of A, the rest row blocks of B."""
    pid = tl.program_id(0)
    tile = tl.program_id(1)
    n_tiles_a = tl.cdiv(N, BLOCK)
    vec = vec_ptr + pid * 9
    ok_f = tl.load(vec)  # 1.0 or 0.0
    inv_s = tl.load(vec + 1)
    sq_mr = tl.load(vec + 3)  # sqrt(mean R_new): P^-1 = sq_mr / sqrt(R_new)
    sqrt_bc2 = tl.load(vec + 5)
    first = tl.load(vec + 7) != 0
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < RANK
    ok_r = (tl.zeros((R_PAD,), dtype=tl.float32) + ok_f) != 0  # broadcast the pair's flag
    offs = tl.arange(0, BLOCK)
    mat = mats_ptr + pid * 3 * R_PAD * R_PAD + offs_r[:, None] * R_PAD + offs_r[None, :]
    Y = tl.load(mat + R_PAD * R_PAD)
    if tile < n_tiles_a:
        offs_n = tile * BLOCK + offs
        mask_n = offs_n < N
        mask = mask_r[:, None] & mask_n[None, :]
        mask_ok = mask & ok_r[:, None]
        idx = offs_r[:, None] * N + offs_n[None, :]
        step_size = tl.load(vec + 4)  # A's learning rate (its group's)
        wd_mult = tl.load(vec + 6)
        a_ptrs = tl.load(a_tab + pid).to(tl.pointer_type(PARAM_DTYPE)) + idx
        ga_ptrs = tl.load(ga_tab + pid).to(tl.pointer_type(PARAM_DTYPE)) + idx
        a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
        ga = tl.load(ga_ptrs, mask=mask, other=0.0).to(tl.float32) * inv_s
        q = tl.sqrt(tl.load(C_new_ptr + pid * N + offs_n, mask=mask_n, other=1.0))
        gaq = ga * tl.where(mask_n, 1.0 / q, 0.0)[None, :]
        Xb = tl.load(mat)
        d = tl.dot(Xb, gaq, input_precision="ieee") - tl.dot(Y, a, input_precision="ieee")
        st = pid * RANK * N + idx
        a = _update(a, d, m1a_ptr + st, m2a_ptr + st, mask_ok, first, step_size, sqrt_bc2, wd_mult,
                    beta1, beta2, eps, momentum, VARIANT)
        tl.store(a_ptrs, a.to(PARAM_DTYPE), mask=mask_ok)
        a_w = tl.where(mask, a.to(PARAM_DTYPE).to(tl.float32), 0.0)
        tl.store(norms_ptr + pid * tl.num_programs(1) + tile, tl.sum(tl.sum(a_w * a_w, axis=1), axis=0))
    else:
        offs_m = (tile - n_tiles_a) * BLOCK + offs
        mask_m = offs_m < M
        mask = mask_m[:, None] & mask_r[None, :]
        mask_ok = mask & ok_r[None, :]
        idx = offs_m[:, None] * RANK + offs_r[None, :]
        step_size = tl.load(vec + 2)  # B's learning rate (its own group's, e.g. LoRA+)
        wd_mult = tl.load(vec + 8)
        b_ptrs = tl.load(b_tab + pid).to(tl.pointer_type(PARAM_DTYPE)) + idx
        gb_ptrs = tl.load(gb_tab + pid).to(tl.pointer_type(PARAM_DTYPE)) + idx
        b = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
        gb = tl.load(gb_ptrs, mask=mask, other=0.0).to(tl.float32) * inv_s
        r_new = tl.load(R_new_ptr + pid * M + offs_m, mask=mask_m, other=1.0)
        p_inv = tl.where(mask_m, sq_mr / tl.sqrt(r_new), 0.0)
        MAi = tl.load(mat + 2 * R_PAD * R_PAD)
        d = tl.dot(gb * p_inv[:, None], MAi, input_precision="ieee") - tl.dot(b, Y, input_precision="ieee")
        st = pid * M * RANK + idx
        b = _update(b, d, m1b_ptr + st, m2b_ptr + st, mask_ok, first, step_size, sqrt_bc2, wd_mult,
                    beta1, beta2, eps, momentum, VARIANT)
        tl.store(b_ptrs, b.to(PARAM_DTYPE), mask=mask_ok)
        b_w = tl.where(mask, b.to(PARAM_DTYPE).to(tl.float32), 0.0)
        tl.store(norms_ptr + pid * tl.num_programs(1) + tile, tl.sum(tl.sum(b_w * b_w, axis=1), axis=0))


@triton.jit
def _bucket_rescale_kernel(
    # Pointer tables and stacked momentum buffers
    a_tab, b_tab, m1a_ptr, m1b_ptr,
    # Per pair rebalancing factor c (k,): A / c, B * c
    c_ptr,
    # Dimensions
    M, N, RANK,
    # Meta-parameters
    PARAM_DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, R_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """sgd variant only: the rebalancing B c, A / c (and the momentum buffers alike) after the step."""
    pid = tl.program_id(0)
    tile = tl.program_id(1)
    n_tiles_a = tl.cdiv(N, BLOCK)
    c = tl.load(c_ptr + pid)
    offs_r = tl.arange(0, R_PAD)
    offs = tl.arange(0, BLOCK)
    if tile < n_tiles_a:
        offs_n = tile * BLOCK + offs
        mask = (offs_r < RANK)[:, None] & (offs_n < N)[None, :]
        idx = offs_r[:, None] * N + offs_n[None, :]
        a_ptrs = tl.load(a_tab + pid).to(tl.pointer_type(PARAM_DTYPE)) + idx
        a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(a_ptrs, (a / c).to(PARAM_DTYPE), mask=mask)
        if HAS_MOMENTUM:
            buf = tl.load(m1a_ptr + pid * RANK * N + idx, mask=mask, other=0.0)
            tl.store(m1a_ptr + pid * RANK * N + idx, buf / c, mask=mask)
    else:
        offs_m = (tile - n_tiles_a) * BLOCK + offs
        mask = (offs_m < M)[:, None] & (offs_r < RANK)[None, :]
        idx = offs_m[:, None] * RANK + offs_r[None, :]
        b_ptrs = tl.load(b_tab + pid).to(tl.pointer_type(PARAM_DTYPE)) + idx
        b = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(b_ptrs, (b * c).to(PARAM_DTYPE), mask=mask)
        if HAS_MOMENTUM:
            buf = tl.load(m1b_ptr + pid * M * RANK + idx, mask=mask, other=0.0)
            tl.store(m1b_ptr + pid * M * RANK + idx, buf * c, mask=mask)


# %%
# Batched r x r algebra (phase b): `functional.solve_from_grams`, torch ops with no host sync
# ------------------------------------------------------------------------------------------


# %%
# Wrapper
# -------

_TABLES: dict = {}


def _table(tensors: Sequence[torch.Tensor], device) -> torch.Tensor:
    """int64 tensor of the tensors' addresses on `device`, cached: a step with the same tensors
    (CUDA-graph replays, static gradients) reuses it without a host-to-device copy."""
    key = (str(device),) + tuple(t.data_ptr() for t in tensors)
    tab = _TABLES.get(key)
    if tab is None:
        if len(_TABLES) > 4096:
            _TABLES.clear()
        tab = _TABLES[key] = torch.tensor(key[1:], dtype=torch.int64, device=device)
    return tab


def _rows(x: Union[torch.Tensor, Sequence[torch.Tensor]]) -> list:
    return list(x.unbind(0)) if isinstance(x, torch.Tensor) else list(x)


def fused_bucket_step(
    A: Sequence[torch.Tensor], B: Sequence[torch.Tensor],
    gradA: Sequence[torch.Tensor], gradB: Sequence[torch.Tensor],
    row: Union[torch.Tensor, Sequence[torch.Tensor]], col: Union[torch.Tensor, Sequence[torch.Tensor]],
    state: dict, scale: torch.Tensor, lr, *, lr_B=None, variant: str = "adamw", betas=(0.9, 0.999), eps: float = 1e-8,
    weight_decay: float = 0.0, momentum: float = 0.0, decay_rate: float = -0.8, eps_factored: float = 1e-30,
    clip_threshold: Optional[float] = 1.0, damping: float = 0.1, rebalance: bool = True,
) -> torch.Tensor:
    """One AdaPreLoRA step (spec 3.2 to 3.5) for a bucket of k pairs of equal (m, n, r, dtype), in place.

    Args:
        A, B: the k factors (r, n) / (m, r) (conv factors (r, in, kh, kw) / (out, r, 1, 1)),
            contiguous, one dtype (float32, bfloat16 or float16); updated in place.
        gradA, gradB: their `.grad` (the LoRA scale s included, as autograd gives them).
        row, col: gradient energies, (k, m) / (k, n) float32 or lists of (m,) / (n,).
        state: the bucket's stacked float32 state (`base.Bucket.state`): "step" (k,),
            "adafactor_row" (k, m), "adafactor_col" (k, n), and "exp_avg_A", "exp_avg_sq_A",
            "exp_avg_B", "exp_avg_sq_B" (adamw) or "momentum_buffer_A/B" (sgd with momentum);
            updated in place.
        scale: (k,) LoRA scales s. lr: float or 0-d device tensor; lr_B: B's, when B sits in
            another param group than A (kohya's LoRA+), else None (= lr).
    Returns:
        ok (k,) bool: pairs that were updated (the others had a NaN/inf gradient or energy and
        were left untouched, state included). Nothing here synchronises with the host.
    """
    k = len(A)
    if variant not in ("adamw", "sgd"):
        raise ValueError(f"variant must be 'adamw' or 'sgd', got {variant!r}")
    if not (len(B) == len(gradA) == len(gradB) == k) or k == 0:
        raise ValueError("A, B, gradA, gradB must list the same (non-zero) number of pairs")
    dtype, device = A[0].dtype, A[0].device
    if dtype not in _TL_DTYPES:
        raise ValueError(f"fused step supports float32, bfloat16, float16 factors, got {dtype}")
    if device.type != "cuda" and not _INTERPRET:
        raise RuntimeError("the fused Triton step needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    r, n = A[0].shape[0], A[0][0].numel()
    m = B[0].shape[0]
    for t in (*A, *B, *gradA, *gradB):
        if t.dtype != dtype or not t.is_contiguous() or t.device != device:
            raise ValueError("fused step: factors and gradients must be contiguous, on one device, of one dtype")
    rows, cols = [e.float().contiguous() for e in _rows(row)], [e.float().contiguous() for e in _rows(col)]
    f32 = torch.float32
    R, C, step = state["adafactor_row"], state["adafactor_col"], state["step"]
    R_PAD = max(16, triton.next_power_of_2(r))
    BLOCK = 32 if _INTERPRET else 64
    inv_s = (1.0 / scale.to(device=device, dtype=f32)).reshape(k)

    # phase (a): new accumulators and Grams
    t_new = torch.clamp(step + 1, min=1).to(f32)
    beta2_t = 1.0 - t_new ** decay_rate
    R_new = torch.empty((k, m), device=device, dtype=f32)
    C_new = torch.empty((k, n), device=device, dtype=f32)
    grams = torch.empty((k, 9, R_PAD, R_PAD), device=device, dtype=f32)
    stats = torch.empty((k, 3), device=device, dtype=f32)
    tabs = [_table(ts, device) for ts in (A, B, gradA, gradB, rows, cols)]
    _bucket_grams_kernel[(k, 2)](
        *tabs, R, C, beta2_t, inv_s, R_new, C_new, grams, stats, m, n, r, eps_factored,
        PARAM_DTYPE=_TL_DTYPES[dtype], R_PAD=R_PAD, BLOCK=BLOCK, num_warps=4,
    )

    # phase (b): r x r solves and the clip factor, batched over the bucket
    ok = stats[:, 1:].sum(1) == 0  # NaN (a non-finite read) fails the test
    mean_r = stats[:, 0] / m
    MBi, Y, MAi = solve_from_grams(grams[:, :, :r, :r], mean_r, m, n, damping, clip_threshold)
    mats = torch.zeros((k, 3, R_PAD, R_PAD), device=device, dtype=f32)
    mats[:, 0, :r, :r], mats[:, 1, :r, :r], mats[:, 2, :r, :r] = MBi, Y, MAi
    new_step = step + ok.to(step.dtype)
    t = new_step.to(f32)
    b1, b2 = betas
    lr_B = lr if lr_B is None else lr_B
    if variant == "adamw":
        step_size, step_size_B = lr / (1 - b1 ** t), lr_B / (1 - b1 ** t)
        sqrt_bc2 = torch.sqrt(1 - b2 ** t)
        kernel_variant = 0
        m1a, m2a, m1b, m2b = (state[x] for x in ("exp_avg_A", "exp_avg_sq_A", "exp_avg_B", "exp_avg_sq_B"))
    else:
        step_size, step_size_B = lr * inv_s, lr_B * inv_s
        sqrt_bc2 = torch.ones_like(t)
        kernel_variant = 2 if momentum else 1
        m1a = state["momentum_buffer_A"] if momentum else R_new  # (unused pointers when no momentum)
        m1b = state["momentum_buffer_B"] if momentum else R_new
        m2a = m2b = R_new
    def per_pair(x):
        return torch.as_tensor(x, dtype=f32, device=device).expand(k)

    vec = torch.stack([
        ok.to(f32), inv_s, per_pair(step_size_B), torch.sqrt(mean_r), per_pair(step_size), sqrt_bc2,
        per_pair(1 - lr * weight_decay), (t <= 1).to(f32), per_pair(1 - lr_B * weight_decay),
    ], dim=1).contiguous()

    # phase (c): directions, clipping, moments, weight decay and the parameter write
    n_tiles = triton.cdiv(n, BLOCK) + triton.cdiv(m, BLOCK)
    norms = torch.empty((k, n_tiles), device=device, dtype=f32)
    _bucket_apply_kernel[(k, n_tiles)](
        *tabs[:4], R_new, C_new, m1a, m2a, m1b, m2b, mats, vec, norms, m, n, r,
        b1, b2, eps, momentum,
        PARAM_DTYPE=_TL_DTYPES[dtype], VARIANT=kernel_variant, R_PAD=R_PAD, BLOCK=BLOCK, num_warps=4,
    )
    R.copy_(torch.where(ok[:, None], R_new, R))
    C.copy_(torch.where(ok[:, None], C_new, C))
    step.copy_(new_step)

    # phase (d), sgd only: rebalance B c, A / c with c = sqrt(||A|| / ||B||)
    if variant == "sgd" and rebalance:
        n_a = triton.cdiv(n, BLOCK)
        na, nb = torch.sqrt(norms[:, :n_a].sum(1)), torch.sqrt(norms[:, n_a:].sum(1))
        c = rebalance_from_norms(na, nb, ok)
        _bucket_rescale_kernel[(k, n_tiles)](
            tabs[0], tabs[1], m1a, m1b, c, m, n, r,
            PARAM_DTYPE=_TL_DTYPES[dtype], HAS_MOMENTUM=bool(momentum), R_PAD=R_PAD, BLOCK=BLOCK, num_warps=4,
        )
    return ok


# %%
# Unit Test
# ---------
#
# tests/test_triton_kernels.py: `fused_bucket_step` equals the torch path (`functional`) over
# several steps, both variants, and the whole optimizer with backend="triton" equals "torch".
