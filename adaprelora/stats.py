"""Exact gradient energies (spec 3.1, `stats="exact"`), gathered by hooks during backward.

For each adapted layer a forward hook on `lora_A` keeps its input X (the tensor autograd already
saves for A's gradient, so no extra memory); a forward hook on `lora_B` registers a tensor hook on
its output, whose gradient is s * Delta. In backward that hook reduces G = Delta^T X to its row and
column energies and drops G at once. Energies of micro-batches add up until the optimizer step
(exact for one micro-batch, an approximation with gradient accumulation); under DDP they are
averaged across ranks at the step; an fp16 loss scale is divided out.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .kernels import conv_gradient_energies, gradient_energies
from .pairs import LoraPair


class ExactEnergyCollector:
    """Owns the hooks and the per-pair energy buffers; `remove()` takes the hooks out."""

    def __init__(self, pairs: Sequence[LoraPair], energy_fn: Optional[Callable] = None,
                 conv_energy_fn: Optional[Callable] = None):
        missing = [p.name for p in pairs if p.lora_A_module is None or p.lora_B_module is None]
        if missing:
            raise ValueError(
                "stats='exact' needs the model's LoRA modules to hook, but pairs "
                f"{missing[:3]} were given as bare tensors; pass the model or use stats='tangent'"
            )
        self.pairs = list(pairs)
        self.energy_fn = energy_fn or gradient_energies
        self.conv_energy_fn = conv_energy_fn or conv_gradient_energies
        self.rows: list[Optional[torch.Tensor]] = [None] * len(self.pairs)
        self.cols: list[Optional[torch.Tensor]] = [None] * len(self.pairs)
        self._inputs: dict[int, torch.Tensor] = {}
        self._grad_scaler = None
        self._handles = []
        for i, pair in enumerate(self.pairs):
            self._handles.append(pair.lora_A_module.register_forward_hook(self._make_input_hook(i)))
            self._handles.append(pair.lora_B_module.register_forward_hook(self._make_output_hook(i)))

    # -- hooks -------------------------------------------------------------------------------
    def _make_input_hook(self, i: int):
        def hook(module, args, output):
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
                self._inputs[i] = args[0].detach()

        return hook

    def _make_output_hook(self, i: int):
        def hook(module, args, output):
            x = self._inputs.pop(i, None)
            if x is None or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            output.register_hook(lambda grad: self._accumulate(i, x, grad))

        return hook

    @torch.no_grad()
    def _accumulate(self, i: int, x: torch.Tensor, grad: torch.Tensor) -> None:
        pair = self.pairs[i]
        if pair.is_conv:
            row, col = self.conv_energy_fn(x, grad, pair.lora_A_module)
        else:
            row, col = self.energy_fn(x, grad)
        s = pair.scaling()
        inv_s2 = 1.0 / (s * s) if s != 0 else 1.0  # the hook sees s * Delta; G = Delta^T X
        row, col = row * inv_s2, col * inv_s2
        if self.rows[i] is None:
            self.rows[i], self.cols[i] = row, col
        else:
            self.rows[i] = self.rows[i] + row
            self.cols[i] = self.cols[i] + col

    # -- optimizer side ----------------------------------------------------------------------
    def set_grad_scaler(self, scaler) -> None:
        self._grad_scaler = scaler

    def _loss_scale(self) -> float:
        scaler = self._grad_scaler
        if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
            return 1.0
        return float(scaler.get_scale())

    def take(self, indices: Sequence[int]):
        """Energies of pairs `indices` since the last reset, as lists (None where a pair saw no
        backward), with the loss scale divided out. Call `synchronize()` first under DDP."""
        scale = self._loss_scale()
        factor = 1.0 / (scale * scale)
        rows, cols = [], []
        for i in indices:
            r, c = self.rows[i], self.cols[i]
            if r is not None and factor != 1.0:
                r, c = r * factor, c * factor
            rows.append(r)
            cols.append(c)
        return rows, cols

    def synchronize(self) -> None:
        """Average the energies across ranks: one all-reduce of sum(m + n) numbers."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        have = [i for i, r in enumerate(self.rows) if r is not None]
        ref = self.pairs[0].A
        for i, r in enumerate(self.rows):  # every rank must contribute the same layout
            if r is None:
                self.rows[i] = torch.zeros(self.pairs[i].m, device=ref.device)
                self.cols[i] = torch.zeros(self.pairs[i].n, device=ref.device)
        flat = torch.cat([t for i in range(len(self.rows)) for t in (self.rows[i], self.cols[i])])
        count = torch.tensor([float(len(have) > 0)], device=flat.device)
        flat = torch.cat([flat, count])
        dist.all_reduce(flat)
        ranks_with_data = flat[-1].clamp_min(1)
        flat = flat[:-1] / ranks_with_data
        offset = 0
        for i, pair in enumerate(self.pairs):
            self.rows[i] = flat[offset: offset + pair.m]
            offset += pair.m
            self.cols[i] = flat[offset: offset + pair.n]
            offset += pair.n

    def reset(self) -> None:
        self.rows = [None] * len(self.pairs)
        self.cols = [None] * len(self.pairs)
        self._inputs.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.reset()
