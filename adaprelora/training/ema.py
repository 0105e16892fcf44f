"""Exponential moving average (EMA) of a list of trained parameters, for any trainer.

The average of the last few hundred steps' weights is often a better LoRA than the last step's
alone: it smooths the noise of small batches (OneTrainer, SimpleTuner and ai-toolkit offer it).
`ParameterEMA` keeps an fp32 copy of each tensor (on the parameters' device or on the CPU) and
follows diffusers' `EMAModel` in when it starts and how its decay warms up:

    update n (1, 2, ...), t = n - update_after_step - 1
    t <= 0:  decay 0 (the average is a copy of the weights)
    t > 0:   decay min(ema_decay, (1 + t) / (10 + t))   (warmup "ratio", OneTrainer's and diffusers' default)
             decay ema_decay                            (warmup "none")
    ema <- decay * ema + (1 - decay) * weight

Without the warm-up a decay of 0.999 would keep most of the untrained start for thousands of
steps; with it the average covers about the last tenth of the steps until that reaches `ema_decay`.

    ema = ParameterEMA(params, decay=0.999)
    ...  optimizer.step(); ema.update()
    with ema.swapped_in():   # the EMA weights in the parameters; the raw ones back afterwards
        sample(model)

`state_dict()` / `load_state_dict()` hold the averages and the update count, so a resumed run
continues the same average; `save_ema` / `load_ema` write them as a safetensors file in a
checkpoint folder.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

# How the decay ramps up to `decay` (module docstring).
EMA_WARMUPS = ("ratio", "none")
# The EMA's file in a `checkpoint-<step>/` folder.
EMA_STATE_FILE = "ema_state.safetensors"


class ParameterEMA:
    """The EMA of `parameters` (the tensors a trainer updates), kept in fp32.

    `decay` is the decay the average reaches (0 < decay < 1); `warmup` one of `EMA_WARMUPS`;
    the first `update_after_step` updates copy the weights (diffusers' `update_after_step`);
    `device` holds the averages (default: each parameter's own device; "cpu" saves accelerator
    memory at the cost of a copy per step); `names` (one per parameter) key the saved state.
    """

    def __init__(self, parameters: Iterable[torch.Tensor], decay: float = 0.999, *, warmup: str = "ratio",
                 update_after_step: int = 0, device: Optional[Union[str, torch.device]] = None,
                 names: Optional[Sequence[str]] = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1 (exclusive), got {decay}")
        if warmup not in EMA_WARMUPS:
            raise ValueError(f"EMA warmup must be one of {EMA_WARMUPS}, got {warmup!r}")
        if update_after_step < 0:
            raise ValueError(f"update_after_step must be 0 or more, got {update_after_step}")
        self.parameters = list(parameters)
        if not self.parameters:
            raise ValueError("ParameterEMA needs at least one parameter")
        self.names = list(names) if names is not None else [str(i) for i in range(len(self.parameters))]
        if len(self.names) != len(self.parameters) or len(set(self.names)) != len(self.names):
            raise ValueError("names must give one distinct name per parameter")
        self.decay = float(decay)
        self.warmup = warmup
        self.update_after_step = int(update_after_step)
        self.num_updates = 0
        self.last_decay: Optional[float] = None  # the decay of the latest update
        self._swapped = False
        with torch.no_grad():
            self.shadow = [p.detach().to(device=device if device is not None else p.device, dtype=torch.float32,
                                         copy=True)
                           for p in self.parameters]

    def decay_at(self, n: int) -> float:
        """The decay update number `n` (1-based) uses."""
        t = n - self.update_after_step - 1
        if t <= 0:
            return 0.0
        if self.warmup == "none":
            return self.decay
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self) -> float:
        """Fold the parameters' current values into the average; returns the decay used."""
        if self._swapped:
            raise RuntimeError("ParameterEMA.update() inside swapped_in(): the parameters hold the average")
        self.num_updates += 1
        decay = self.decay_at(self.num_updates)
        sources = [p.detach().to(device=s.device, dtype=torch.float32) for p, s in zip(self.parameters, self.shadow)]
        if decay == 0.0:  # an exact copy (a lerp by 1 is not always one)
            torch._foreach_copy_(self.shadow, sources)
        else:
            torch._foreach_lerp_(self.shadow, sources, 1.0 - decay)
        self.last_decay = decay
        return decay

    @torch.no_grad()
    def copy_to(self, parameters: Optional[Iterable[torch.Tensor]] = None) -> None:
        """Write the averages into `parameters` (default: the tracked ones), cast to their dtype."""
        targets = self.parameters if parameters is None else list(parameters)
        if len(targets) != len(self.shadow):
            raise ValueError(f"copy_to: {len(targets)} parameters for {len(self.shadow)} averages")
        for p, s in zip(targets, self.shadow):
            p.copy_(s.to(device=p.device, dtype=p.dtype))

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator["ParameterEMA"]:
        """The averages in the parameters for the time of the `with` block; the raw values,
        restored bit for bit, afterwards (also when the block raises)."""
        if self._swapped:
            raise RuntimeError("ParameterEMA.swapped_in() is already active")
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.parameters]
            self.copy_to()
        self._swapped = True
        try:
            yield self
        finally:
            with torch.no_grad():
                for p, r in zip(self.parameters, raw):
                    p.copy_(r)
            self._swapped = False

    def state_dict(self) -> dict:
        """{"shadow": {name: fp32 tensor}, "num_updates", "decay", "warmup", "update_after_step"}."""
        return {"shadow": dict(zip(self.names, self.shadow)), "num_updates": self.num_updates,
                "decay": self.decay, "warmup": self.warmup, "update_after_step": self.update_after_step}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore the averages and the update count of `state_dict()`. The names and shapes must be
        this EMA's (`ValueError` naming the first difference); the decay settings stay this
        object's, so a resumed run uses the flags it was started with."""
        shadow = state["shadow"]
        missing = [n for n in self.names if n not in shadow]
        extra = [n for n in shadow if n not in set(self.names)]
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which this model does not"
            raise ValueError(f"the EMA state does not match the trained tensors: it {what} "
                             f"({len(shadow)} tensors saved, {len(self.names)} trained)")
        for name, s in zip(self.names, self.shadow):
            saved = shadow[name]
            if tuple(saved.shape) != tuple(s.shape):
                raise ValueError(f"the EMA state's {name!r} has shape {tuple(saved.shape)}, the trained tensor "
                                 f"{tuple(s.shape)}")
            s.copy_(saved.to(device=s.device, dtype=torch.float32))
        self.num_updates = int(state["num_updates"])
        self.last_decay = self.decay_at(self.num_updates) if self.num_updates else None

    @torch.no_grad()
    def reset(self) -> None:
        """Start over from the parameters' current values (no update done yet)."""
        torch._foreach_copy_(self.shadow, [p.detach().to(device=s.device, dtype=torch.float32)
                                           for p, s in zip(self.parameters, self.shadow)])
        self.num_updates = 0
        self.last_decay = None


def save_ema(ema: ParameterEMA, folder: str) -> str:
    """Write `ema`'s state to `folder/ema_state.safetensors` (the averages by name, the counts in
    the header); returns the path."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    tensors = {name: t.detach().cpu().contiguous() for name, t in state.pop("shadow").items()}
    path = os.path.join(folder, EMA_STATE_FILE)
    save_file(tensors, path, metadata={key: str(value) for key, value in state.items()})
    return path


def load_ema(ema: ParameterEMA, folder: str) -> bool:
    """Load `folder/ema_state.safetensors` into `ema`; False when the folder has none (a checkpoint
    of a run without EMA). A file that does not match raises `ValueError`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.path.join(folder, EMA_STATE_FILE)
    if not os.path.isfile(path):
        return False
    with safe_open(path, framework="pt") as fh:
        header = dict(fh.metadata() or {})
    if "num_updates" not in header:
        raise ValueError(f"{path} has no update count in its header")
    ema.load_state_dict({"shadow": load_file(path), "num_updates": int(header["num_updates"])})
    return True


__all__ = ["EMA_STATE_FILE", "EMA_WARMUPS", "ParameterEMA", "load_ema", "save_ema"]
