"""Kernel dispatch: Triton on CUDA when importable, the PyTorch reference everywhere else."""
from __future__ import annotations

import os

from .reference import conv_gradient_energies, gradient_energies

__all__ = [
    "conv_gradient_energies",
    "conv_gradient_energies_for",
    "gradient_energies",
    "gradient_energies_for",
    "resolve_backend",
    "triton_available",
    "triton_energy_functions",
]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str, device) -> str:
    """"auto" -> "triton" on CUDA when Triton imports, else "torch". "triton" off CUDA needs
    TRITON_INTERPRET=1 (the CPU interpreter, for tests) and is an error otherwise."""
    import torch

    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    is_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        return "triton" if is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if not is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 for the CPU "
                "interpreter in tests); use backend='torch' or 'auto' on CPU"
            )
    return backend


def gradient_energies_for(backend: str):
    """The energy function `(x, delta) -> (row, col)` for a *resolved* backend ("torch" or
    "triton", as returned by `resolve_backend`). Triton is imported only when asked for."""
    if backend == "triton":
        from .energies import gradient_energies_triton

        return gradient_energies_triton
    if backend == "torch":
        return gradient_energies
    raise ValueError(f"resolve the backend first (resolve_backend); got {backend!r}")


def conv_gradient_energies_for(backend: str):
    """The conv energy function `(x, delta, conv) -> (row, col)` for a resolved backend."""
    if backend == "triton":
        from .energies import conv_gradient_energies_triton

        return conv_gradient_energies_triton
    if backend == "torch":
        return conv_gradient_energies
    raise ValueError(f"resolve the backend first (resolve_backend); got {backend!r}")


def triton_energy_functions():
    """(linear, conv) Triton energy functions: what `AdaPreLoRA._energy_functions` asks for when
    its backend resolved to "triton" (it hands them to `stats.ExactEnergyCollector`)."""
    return gradient_energies_for("triton"), conv_gradient_energies_for("triton")
