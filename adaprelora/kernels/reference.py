"""PyTorch reference for every kernel op: the oracle the Triton kernels are tested against.

`gradient_energies(x, delta)` returns the row and column sums of G**2 for G = delta^T x, the
weight gradient of one adapted layer (m x n), computed in float32 or better.

Cost model (tokens T, G of size m x n):
  explicit:  G = delta^T x            T*m*n multiply-adds, writes m*n, then reads m*n twice
  gram:      row = diag(delta^T (x x^T) delta) etc.   T^2 (m + n) + T^2 (m + n) multiply-adds
The gram form never forms G and wins when T is small against m*n/(m+n) (short LLM sequences,
cross-attention keys/values over 77 text tokens).
"""
from __future__ import annotations

import torch


def _flat(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).to(dtype)


def gradient_energies(x: torch.Tensor, delta: torch.Tensor, method: str = "auto"):
    """Row energies (m,) and column energies (n,) of G = delta^T x.

    Args:
        x: layer input, (..., n); all leading dims are tokens.
        delta: gradient of the layer output, (..., m), same leading dims.
        method: "explicit", "gram" or "auto" (the cheaper of the two by flop count).
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, delta.dtype), torch.float32)
    X, D = _flat(x, dtype), _flat(delta, dtype)
    if X.shape[0] != D.shape[0]:
        raise ValueError(f"x has {X.shape[0]} tokens but delta has {D.shape[0]}")
    T, n = X.shape
    m = D.shape[1]
    if method == "auto":
        method = "gram" if 2 * T * T * (m + n) < T * m * n else "explicit"
    if method == "explicit":
        G = D.t() @ X
        G2 = G * G
        return G2.sum(1), G2.sum(0)
    if method == "gram":
        # row_i = sum_j (sum_t D_ti X_tj)^2 = D_:i^T (X X^T) D_:i ; col likewise with D D^T.
        Kx = X @ X.t()
        Kd = D @ D.t()
        return ((Kx @ D) * D).sum(0), ((Kd @ X) * X).sum(0)
    raise ValueError(f"unknown method {method!r}; use 'explicit', 'gram' or 'auto'")


def conv_gradient_energies(x: torch.Tensor, delta: torch.Tensor, conv: torch.nn.Conv2d):
    """Energies of a Conv2d weight gradient, viewed as (out, in*kh*kw), from the conv's input
    x (N, in, H, W) and output gradient delta (N, out, H', W')."""
    cols = torch.nn.functional.unfold(
        x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
    )  # (N, in*kh*kw, L)
    d = delta.reshape(delta.shape[0], delta.shape[1], -1)  # (N, out, L)
    return gradient_energies(cols.transpose(1, 2), d.transpose(1, 2))
