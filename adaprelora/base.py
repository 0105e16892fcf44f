"""`LoRAPairOptimizer`: the torch.optim plumbing shared by AdaPreLoRA and the preconditioned
baselines. It finds the pairs, buckets them by shape (and param groups) for batched r x r solves,
keeps the state (stacked per bucket, exposed per parameter for `state_dict`), hands each bucket to
its rule's functional step (`step.py`, via `_step_bucket`), reports the pairs that step skipped for
a non-finite gradient, and updates every other trainable tensor with plain AdamW.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch
from torch import nn
from torch.optim import Optimizer

from . import functional as F
from .pairs import LoraPair, find_lora_pairs, pairs_from_tuples
from .param_list_pairs import list_pairs

NO_PAIRS_MSG = (
    "did not find any trainable LoRA (lora_A/lora_B) parameter pairs: this optimizer only applies "
    "to LoRA adapters (add one with peft's get_peft_model or model.add_adapter), or pass "
    "pairs=[(A, B, scale), ...]"
)


@dataclass
class Bucket:
    """Pairs with equal (param groups, device, dtype, m, n, r), stepped together (on a CPU, in
    runs of at most `LoRAPairOptimizer.CPU_BUCKET_BYTES` of factors and gradients). `group` is A's
    param group (every hyperparameter), `group_B` B's (its learning rate: kohya's LoRA+ puts B
    in a group of its own)."""

    group: dict
    group_B: dict
    pair_ids: list
    m: int
    n: int
    r: int
    state: dict = field(default_factory=dict)  # name -> stacked tensor (k, ...), compute dtype
    scales: tuple = ((), None)  # the last (LoRA scales, their (k,) tensor): rebuilt only when a scale changes
    views: dict = field(default_factory=dict)  # per-pair views of `state`, made once (`functional.factor_step_`)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _setting(value):
    """A group setting, compared as a value: betas given as a list equal the same tuple."""
    return tuple(value) if isinstance(value, list) else value


class LoRAPairOptimizer(Optimizer):
    """Base class; see the module docstring. Not for direct use: a subclass implements
    `_step_bucket` with its rule's functional step."""

    def __init__(self, params: Union[nn.Module, Iterable], defaults: dict, *, variant: str = "adamw",
                 pairs=None, nonfinite: str = "skip", pairs_from: Optional[str] = None,
                 lora_scale=None):
        if variant not in ("adamw", "sgd"):
            raise ValueError(f"variant must be 'adamw' or 'sgd', got {variant!r}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self._validate(defaults)
        if isinstance(params, nn.Module):
            if pairs_from is not None or lora_scale is not None:
                raise ValueError("pairs_from and lora_scale apply to parameter lists: a model's pairs and "
                                 "scales are read from its LoRA layers")
            self.model = params
            found = pairs_from_tuples(pairs) if pairs is not None else find_lora_pairs(params)
            params = [p for p in params.parameters() if p.requires_grad]
        else:  # a parameter list: the pairs given, or found from names or order (param_list_pairs)
            self.model = None
            params, found = list_pairs(params, pairs, pairs_from, lora_scale)
        if not found:
            raise ValueError(NO_PAIRS_MSG)
        super().__init__(params, defaults)
        self.variant = variant
        self.nonfinite = nonfinite
        self.pairs: list[LoraPair] = found
        self._pair_group = self._map_pairs_to_groups()
        self._buckets: Optional[list[Bucket]] = None
        self._warned: set = set()

    # -- construction -----------------------------------------------------------------------
    @staticmethod
    def _validate(d: dict) -> None:
        if not d.get("lr", 0) > 0:
            raise ValueError(f"Invalid learning rate: {d.get('lr')}")
        betas = d.get("betas", (0.9, 0.999))
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Invalid betas: {betas}")
        if not d.get("eps", 1e-8) >= 0:
            raise ValueError(f"Invalid eps: {d.get('eps')}")
        if not d.get("weight_decay", 0.0) >= 0:
            raise ValueError(f"Invalid weight_decay: {d.get('weight_decay')}")
        if not 0 <= d.get("momentum", 0.0) < 1:
            raise ValueError(f"Invalid momentum: {d.get('momentum')}")

    def _map_pairs_to_groups(self) -> list:
        """(A's group index, B's group index) of every pair."""
        where = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                where[id(p)] = gi
        out = []
        for pair in self.pairs:
            ga, gb = where.get(id(pair.A)), where.get(id(pair.B))
            if ga is None or gb is None:
                raise ValueError(f"LoRA pair {pair.name!r}: A and B must both be among the optimized parameters")
            if ga != gb:  # LoRA+: B's group gives B its lr; every other setting of the step is A's group's
                a, b = self.param_groups[ga], self.param_groups[gb]
                differ = [k for k in self.defaults if k != "lr" and _setting(a.get(k)) != _setting(b.get(k))]
                if differ:
                    k = differ[0]
                    raise ValueError(
                        f"LoRA pair {pair.name!r}: A is in param group {ga} and B in param group {gb}, whose {k} "
                        f"differ ({a.get(k)!r} vs {b.get(k)!r}), but a pair steps with one {k}: "
                        "give the two groups the same settings except lr (B may have its own lr, as in LoRA+)")
            out.append((ga, gb))
        return out

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("_buckets", None)
        self.__dict__.setdefault("_warned", set())

    # -- state ------------------------------------------------------------------------------
    def _pair_state_shapes(self, m: int, n: int, r: int) -> dict:
        """name -> per-pair shape of the stacked state this optimizer keeps."""
        shapes = {"step": ()}
        if self.variant == "adamw":
            shapes.update(exp_avg_A=(r, n), exp_avg_sq_A=(r, n), exp_avg_B=(m, r), exp_avg_sq_B=(m, r))
        elif any(g.get("momentum", 0) for g in self.param_groups):
            shapes.update(momentum_buffer_A=(r, n), momentum_buffer_B=(m, r))
        shapes.update(self._extra_pair_state(m, n, r))
        return shapes

    def _extra_pair_state(self, m: int, n: int, r: int) -> dict:
        return {}

    @staticmethod
    def _state_key(name: str) -> tuple:
        """Stacked name -> (owner, per-parameter key): exp_avg_A -> ("A", "exp_avg")."""
        if name.endswith("_A") or name.endswith("_B"):
            return name[-1], name[:-2]
        owner = {"adafactor_row": "B", "adafactor_col": "A"}.get(name, "A")
        return owner, name

    # On a CPU, a bucket is split so that its stacked factors and gradients take at most this many
    # bytes: the step's half-dozen passes over them then run from the cache rather than memory
    # (SD 1.5's attention set at r = 16, one thread: step() 2.8x -> 2.1x torch's foreach AdamW;
    # 2 MiB and 12 MiB were slower, 4 MiB a little, 8 MiB level; docs/benchmarks.md). GPUs take
    # whole buckets.
    CPU_BUCKET_BYTES = 6 * 2 ** 20

    def _split(self, ids: list) -> list:
        """[(start, pair ids)]: the bucket's pairs in cache-sized runs on a CPU, whole elsewhere."""
        first = self.pairs[ids[0]]
        if first.A.device.type != "cpu":
            return [(0, ids)]
        per_pair = 2 * first.r * (first.m + first.n) * _compute_dtype(first.A.dtype).itemsize
        runs = -(-len(ids) // max(1, self.CPU_BUCKET_BYTES // per_pair))
        size = -(-len(ids) // runs)  # runs of equal length: no short run paying a whole run's overhead
        return [(start, ids[start:start + size]) for start in range(0, len(ids), size)]

    def _build_buckets(self) -> list:
        groups: dict = {}
        for i, pair in enumerate(self.pairs):
            key = self._pair_group[i] + pair.bucket_key()
            groups.setdefault(key, []).append(i)
        groups = {key + (start,): part for key, ids in groups.items() for start, part in self._split(ids)}
        buckets = []
        for key, ids in groups.items():
            first = self.pairs[ids[0]]
            bucket = Bucket(self.param_groups[key[0]], self.param_groups[key[1]], ids, first.m, first.n, first.r)
            cdt = _compute_dtype(first.A.dtype)
            for name, shape in self._pair_state_shapes(first.m, first.n, first.r).items():
                owner, key_ = self._state_key(name)
                parts = []
                for i in ids:
                    param = getattr(self.pairs[i], owner)
                    old = self.state[param].get(key_)
                    if old is None:
                        old = torch.zeros(shape, dtype=cdt, device=param.device)
                    parts.append(old.detach().to(device=param.device, dtype=cdt).reshape(shape))
                stacked = torch.stack(parts)
                bucket.state[name] = stacked
                for j, i in enumerate(ids):  # per-parameter views: state_dict sees live tensors
                    self.state[getattr(self.pairs[i], owner)][key_] = stacked[j]
                    if name == "step":
                        self.state[self.pairs[i].B]["step"] = stacked[j]
            buckets.append(bucket)
        return buckets

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, then our stacked state restored to the compute dtype (torch would cast
        fp32 Adafactor/Adam state to a bf16 parameter's dtype)."""
        super().load_state_dict(state_dict)
        saved_groups = state_dict["param_groups"]
        for group, saved in zip(self.param_groups, saved_groups):
            for param, pid in zip(group["params"], saved["params"]):
                saved_state = state_dict["state"].get(pid)
                if not saved_state:
                    continue
                for key, value in saved_state.items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        self.state[param][key] = value.detach().to(param.device, _compute_dtype(value.dtype)).clone()
        self._buckets = None

    # -- stepping ---------------------------------------------------------------------------
    def _step_bucket(self, bucket: Bucket, pairs: list) -> torch.Tensor:
        """Step one bucket with the rule's functional (`step.py`); return which pairs it updated
        ((k,) bool). Subclasses implement."""
        raise NotImplementedError

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step. `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._before_pairs()
        if self._buckets is None:
            self._buckets = self._build_buckets()  # the state, as normal tensors: outside inference mode
        # Inference mode drops the autograd and version-counter work of every op: the bucket steps
        # are hundreds of small ops on CPU (8% of step() on one thread, docs/benchmarks.md). Their temporaries and
        # caches (Bucket.scales, Bucket.views) are inference tensors used only here; the state and
        # the parameters are normal tensors updated in place, which inference mode allows.
        with torch.inference_mode():
            for bucket in self._buckets:
                ps = [self.pairs[i] for i in bucket.pair_ids]
                present = [p.A.grad is not None and p.B.grad is not None for p in ps]
                if not any(present):
                    continue
                ok = self._step_bucket(bucket, ps)
                if self.nonfinite == "raise" or "nonfinite" not in self._warned:  # one sync, until warned
                    self._check_nonfinite(ok, present, ps)
        self._after_pairs()
        self._step_other_params()
        return loss

    def _before_pairs(self) -> None:
        pass

    def _after_pairs(self) -> None:
        pass

    @staticmethod
    def _factors(pairs: list) -> tuple:
        """The functional steps' tensor lists: (A, B, A.grad, B.grad)."""
        return [p.A for p in pairs], [p.B for p in pairs], [p.A.grad for p in pairs], [p.B.grad for p in pairs]

    @staticmethod
    def _scales(bucket: Bucket, pairs: list) -> torch.Tensor:
        """(k,) LoRA scales, read at every step (set_scale, rsLoRA); float64 factors keep a float64 1/s.
        The tensor is kept on the bucket while the scales stay the same."""
        values = tuple(p.scaling() for p in pairs)
        if bucket.scales[0] != values:
            dtype = _compute_dtype(pairs[0].A.dtype)
            bucket.scales = (values, torch.tensor(values, dtype=dtype, device=pairs[0].A.device))
        return bucket.scales[1]

    def _check_nonfinite(self, ok: torch.Tensor, present: list, ps) -> None:
        bad = [p and not o for p, o in zip(present, ok.tolist())]
        if any(bad):
            names = [p.name for p, b in zip(ps, bad) if b]
            msg = (f"non-finite gradient in LoRA pair(s) {names[:3]}{' ...' if len(names) > 3 else ''}: "
                   "their update and state were left untouched")
            if self.nonfinite == "raise":
                raise FloatingPointError(msg)
            self._warn_once("nonfinite", msg + " (warned once)")

    # -- parameters outside pairs: plain AdamW ---------------------------------------------
    def _other_params(self, group: dict) -> list:
        pair_ids = {id(t) for p in self.pairs for t in (p.A, p.B)}
        return [p for p in group["params"] if id(p) not in pair_ids and p.grad is not None]

    def _step_other_params(self) -> None:
        for group in self.param_groups:
            params = self._other_params(group)
            if not params:
                continue
            b1, b2 = group["betas"]
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.zeros((), dtype=torch.float32)  # like torch: a CPU scalar
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                grad = p.grad
                if not bool(torch.isfinite(grad).all()):
                    if self.nonfinite == "raise":
                        raise FloatingPointError("non-finite gradient in a trainable non-LoRA tensor")
                    self._warn_once("nonfinite-other", "non-finite gradient in a non-LoRA tensor: its update was skipped (warned once)")
                    continue
                state["step"] += 1
                F.adamw_(p.detach().unsqueeze(0), grad.unsqueeze(0), state["exp_avg"].unsqueeze(0),
                         state["exp_avg_sq"].unsqueeze(0), state["step"].reshape(1).to(p.device), lr=group["lr"],
                         beta1=b1, beta2=b2, eps=group["eps"], weight_decay=group["weight_decay"])
