"""
Fused gradient energies
=======================

You will learn about:

* the row and column energies of a LoRA layer's weight gradient G = delta^T x, and why they can be
  computed at the cost of one weight-gradient GEMM whose m x n output is never written;
* a two-pass, atomic-free reduction: each output tile writes its partial row sums and partial
  column sums to small buffers that torch then sums, so the result is deterministic.
"""

# %%
# Motivations
# -----------
#
# AdaPreLoRA's Adafactor preconditioner needs, for every adapted layer and every step, the squared
# weight gradient summed over its rows and over its columns (docs/triton.md, spec section 3.1).
# LoRA training never forms the m x n gradient G = delta^T x: materialising it only to reduce it is
#
#   G = D^T X                    read T*(m+n) elements ; T*m*n multiply-adds ; write m*n elements
#   G2 = G * G                   read m*n ; write m*n
#   row, col = G2.sum(1), G2.sum(0)            read m*n twice ; write m + n
#
# i.e. about 5 m*n extra memory traffic and a transient m*n buffer (4096 x 11008 fp32: 180 MB per
# layer).  The kernel below computes a BLOCK_M x BLOCK_N tile of G in registers with `tl.dot` over
# the token dimension, squares it, reduces it along both axes and writes only
#
#   row_part[pid_n, m-tile]  (BLOCK_M numbers) and  col_part[pid_m, n-tile]  (BLOCK_N numbers),
#
# so the extra traffic is m * cdiv(n, BLOCK_N) + n * cdiv(m, BLOCK_M) floats, a factor ~BLOCK/2 less
# than m*n.  A second, tiny pass (`sum(0)` in torch) adds the partials.  Atomics would save that pass
# but make the result depend on the order in which tiles finish; the partial buffers cost a few MB
# at Llama shapes and keep the result bit-for-bit reproducible.
#
# The token dimension cannot be split across programs (split-K): the tile must be complete before
# it is squared.  Occupancy at small m, n therefore comes from smaller tiles (autotune configs).

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    if _INTERPRET:
        # The interpreter runs one config (autotuning there fails) and is fastest with few programs.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_T": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_T": 32}, num_stages=4, num_warps=8),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_T": 64}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_T": 32}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_T": 32}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_T": 64}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_T": 64}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_T": 64}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_T": 64}, num_stages=4, num_warps=4),
    ]


# Smallest tile sides over all configs: the partial buffers are sized for them (see the wrapper).
_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _configs())
_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _configs())


# %%
# Compute Kernel
# --------------


@triton.autotune(configs=_configs(), key=["M", "N", "T", "IEEE", "UPCAST"])
@triton.jit
def _gradient_energies_kernel(
    # Pointers to matrices
    x_ptr, d_ptr, row_part_ptr, col_part_ptr,
    # Matrix dimensions: tokens, layer input width n, layer output width m
    T, N, M,
    # Strides (in elements)
    stride_xt, stride_xn, stride_dt, stride_dm,
    stride_rp, stride_cp,
    # Meta-parameters
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of G = D^T X, squared and reduced both ways; G is never stored."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # D^T tile (BLOCK_M x BLOCK_T) and X tile (BLOCK_T x BLOCK_N), both walked along the tokens.
    dt_ptrs = d_ptr + offs_m[:, None] * stride_dm + offs_t[None, :] * stride_dt
    x_ptrs = x_ptr + offs_t[:, None] * stride_xt + offs_n[None, :] * stride_xn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        mask_t = (t0 + offs_t) < T
        dt = tl.load(dt_ptrs, mask=mask_m[:, None] & mask_t[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=mask_t[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # interpreter only: its tl.dot on bf16 operands is wrong (numpy has no bf16)
            dt = dt.to(tl.float32)
            x = x.to(tl.float32)
        if IEEE:  # fp32 inputs: full-precision products, not TF32
            acc = tl.dot(dt, x, acc, input_precision="ieee")
        else:  # bf16 / fp16 inputs: tensor cores, fp32 accumulation
            acc = tl.dot(dt, x, acc)
        dt_ptrs += BLOCK_T * stride_dt
        x_ptrs += BLOCK_T * stride_xt
    g2 = acc * acc  # masked rows / columns are exact zeros and add nothing
    tl.store(row_part_ptr + pid_n * stride_rp + offs_m, tl.sum(g2, axis=1), mask=mask_m)
    tl.store(col_part_ptr + pid_m * stride_cp + offs_n, tl.sum(g2, axis=0), mask=mask_n)


# %%
# Wrapper
# -------

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_device(t: torch.Tensor):
    if t.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            "the Triton energy kernel needs a CUDA tensor (or TRITON_INTERPRET=1 set before "
            f"triton is imported, for the CPU interpreter); got a tensor on {t.device}"
        )


def gradient_energies_triton(x: torch.Tensor, delta: torch.Tensor):
    """Row energies (m,) and column energies (n,) of G = delta^T x, as float32, without forming G.

    Same contract as `adaprelora.kernels.reference.gradient_energies`: x is the layer input
    (..., n), delta the gradient of the layer output (..., m); all leading dims are tokens.
    Inputs may be float32, bfloat16 or float16 (mixed inputs are promoted to a common type);
    float64 inputs go to the torch reference (float64 results).
    """
    # (1) check the shape constraints
    if x.shape[:-1].numel() != delta.shape[:-1].numel():
        raise ValueError(f"x has {x.shape[:-1].numel()} tokens but delta has {delta.shape[:-1].numel()}")
    dtype = torch.promote_types(x.dtype, delta.dtype)
    if dtype not in _KERNEL_DTYPES:
        from .reference import gradient_energies

        return gradient_energies(x, delta, method="explicit")
    _check_device(x)
    X = x.reshape(-1, x.shape[-1]).to(dtype)
    D = delta.reshape(-1, delta.shape[-1]).to(dtype)
    T, n = X.shape
    m = D.shape[1]
    # (2) allocate the outputs: partial sums sized for the smallest tile any config may pick;
    # a larger tile leaves its extra partial rows at zero.
    row_part = torch.zeros((triton.cdiv(n, _MIN_BLOCK_N), m), device=X.device, dtype=torch.float32)
    col_part = torch.zeros((triton.cdiv(m, _MIN_BLOCK_M), n), device=X.device, dtype=torch.float32)
    if T == 0 or m == 0 or n == 0:
        return row_part.sum(0), col_part.sum(0)
    # (3) launch the kernel, then the tiny second pass
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]), triton.cdiv(n, META["BLOCK_N"]))  # noqa: E731
    _gradient_energies_kernel[grid](
        X, D, row_part, col_part,
        T, n, m,
        X.stride(0), X.stride(1), D.stride(0), D.stride(1),
        row_part.stride(0), col_part.stride(0),
        IEEE=dtype == torch.float32,
        UPCAST=_INTERPRET and dtype == torch.bfloat16,
    )
    return row_part.sum(0), col_part.sum(0)


def conv_gradient_energies_triton(x: torch.Tensor, delta: torch.Tensor, conv: torch.nn.Conv2d):
    """Energies of a Conv2d weight gradient viewed as (out, in*kh*kw), through its unfolded input
    (same contract as `reference.conv_gradient_energies`). 1x1 convs skip the unfold."""
    if conv.groups != 1:
        raise ValueError("grouped convolutions are not supported by the energy kernel")
    N = x.shape[0]
    d = delta.reshape(N, delta.shape[1], -1).transpose(1, 2)  # (N, L, out)
    padding = conv.padding
    if isinstance(padding, str):  # "valid" or "same" (stride 1; PyTorch pads symmetrically for odd k)
        if padding == "valid":
            padding = (0, 0)
        elif all(k % 2 == 1 for k in conv.kernel_size):
            padding = tuple(dl * (k - 1) // 2 for k, dl in zip(conv.kernel_size, conv.dilation))
        else:
            raise ValueError("padding='same' with an even kernel is not supported by the energy kernel")
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and tuple(padding) == (0, 0):
        cols = x.reshape(N, x.shape[1], -1).transpose(1, 2)  # (N, L, in): no unfold needed
    else:
        cols = torch.nn.functional.unfold(
            x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride
        ).transpose(1, 2)  # (N, L, in*kh*kw)
    return gradient_energies_triton(cols, d)


# %%
# Unit Test
# ---------
#
# tests/test_triton_kernels.py compares against the explicit torch reduction on shapes such as
# (T, m, n) = (45, 37, 53) that are no multiple of any block size, in fp32, bf16 and fp16.
#
# Benchmark
# ---------
#
# benchmarks/triton_kernels.py: time and fraction of the measured bf16 matmul rate, on the GPU.
