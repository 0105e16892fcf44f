"""`LoRAPairOptimizer`: the torch.optim plumbing shared by AdaPreLoRA and the preconditioned
baselines. A subclass only says how a bucket of pairs turns gradients into factor directions
(dA, dB); this class finds the pairs, buckets them by shape for batched r x r solves, keeps the
state (stacked per bucket, exposed per parameter for `state_dict`), applies AdamW or SGD, skips
non-finite pairs, and updates every other trainable tensor with plain AdamW.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Optional, Union

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
    """Pairs of one param group with equal (device, dtype, m, n, r), stepped together."""

    group: dict
    pair_ids: list
    m: int
    n: int
    r: int
    state: dict = field(default_factory=dict)  # name -> stacked tensor (k, ...), compute dtype


class StackedBucket(NamedTuple):
    """A bucket's factors, gradients and scales stacked in the compute dtype (`_stack`)."""

    pairs: list  # the bucket's LoraPairs, in order
    A: torch.Tensor  # (k, r, n)
    B: torch.Tensor  # (k, m, r)
    gradA: torch.Tensor  # (k, r, n); zeros for a pair without gradients
    gradB: torch.Tensor  # (k, m, r)
    s: torch.Tensor  # (k, 1, 1) LoRA scales
    present: torch.Tensor  # (k,) bool: the pair has both gradients


@dataclass
class StepContext:
    """What `_directions` receives for one bucket (all stacked, compute dtype)."""

    A: torch.Tensor
    B: torch.Tensor
    gradA: torch.Tensor
    gradB: torch.Tensor
    s: torch.Tensor  # (k, 1, 1) LoRA scales
    step: torch.Tensor  # (k,) new step counts
    ok: torch.Tensor  # (k,) pairs being updated
    bucket: Bucket
    updates: dict = field(default_factory=dict)  # state name -> new stacked value (set by subclasses)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class LoRAPairOptimizer(Optimizer):
    """Base class; see the module docstring. Not for direct use."""

    #: rebalance (B c, A / c) after each SGD step (AdaPreLoRA's sgd variant)
    _rebalance_sgd = False

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
        where = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                where[id(p)] = gi
        out = []
        for pair in self.pairs:
            ga, gb = where.get(id(pair.A)), where.get(id(pair.B))
            if ga is None or gb is None:
                raise ValueError(f"LoRA pair {pair.name!r}: A and B must both be among the optimized parameters")
            if ga != gb:
                raise ValueError(f"LoRA pair {pair.name!r}: A and B must be in the same parameter group")
            out.append(ga)
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

    def _build_buckets(self) -> list:
        groups: dict = {}
        for i, pair in enumerate(self.pairs):
            key = (self._pair_group[i],) + pair.bucket_key()
            groups.setdefault(key, []).append(i)
        buckets = []
        for key, ids in groups.items():
            first = self.pairs[ids[0]]
            bucket = Bucket(self.param_groups[key[0]], ids, first.m, first.n, first.r)
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
    def _directions(self, ctx: StepContext):
        """Return (dA, dB) for a bucket, in the compute dtype. Subclasses implement."""
        raise NotImplementedError

    def _sgd_scale(self, s: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(s)

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
            self._buckets = self._build_buckets()
        for bucket in self._buckets:
            self._step_bucket(bucket)
        self._after_pairs()
        self._step_other_params()
        return loss

    def _before_pairs(self) -> None:
        pass

    def _after_pairs(self) -> None:
        pass

    def _stack(self, bucket: Bucket) -> Optional[StackedBucket]:
        """Stack a bucket's factors, gradients and scales (compute dtype); None if no gradients."""
        ps = [self.pairs[i] for i in bucket.pair_ids]
        As, Bs = [p.A for p in ps], [p.B for p in ps]
        gAs, gBs = [a.grad for a in As], [b.grad for b in Bs]
        m, n, r, k = bucket.m, bucket.n, bucket.r, len(ps)
        cdt = _compute_dtype(As[0].dtype)
        present = [ga is not None and gb is not None for ga, gb in zip(gAs, gBs)]
        if not any(present):
            return None
        if not all(present):
            gAs = [g if ok else torch.zeros_like(a) for g, a, ok in zip(gAs, As, present)]
            gBs = [g if ok else torch.zeros_like(b) for g, b, ok in zip(gBs, Bs, present)]
        A = torch.stack(As).view(k, r, n).to(cdt)
        B = torch.stack(Bs).view(k, m, r).to(cdt)
        gradA = torch.stack(gAs).view(k, r, n).to(cdt)
        gradB = torch.stack(gBs).view(k, m, r).to(cdt)
        s = torch.tensor([p.scaling() for p in ps], dtype=cdt, device=A.device).reshape(-1, 1, 1)
        return StackedBucket(ps, A, B, gradA, gradB, s, torch.tensor(present, device=A.device))

    @staticmethod
    def _finite(*tensors) -> torch.Tensor:
        """(k,) True where every element is finite: a sum is non-finite iff some element is (or the
        values are so large that they overflow, which is no usable gradient either)."""
        ok = None
        for t in tensors:
            f = torch.isfinite(t.sum(tuple(range(1, t.dim()))))
            ok = f if ok is None else ok & f
        return ok

    def _check_nonfinite(self, ok: torch.Tensor, present: torch.Tensor, ps) -> None:
        bad = present & ~ok
        if bool(bad.any()):
            names = [p.name for p, b in zip(ps, bad.tolist()) if b]
            msg = (f"non-finite gradient in LoRA pair(s) {names[:3]}{' ...' if len(names) > 3 else ''}: "
                   "their update and state were left untouched")
            if self.nonfinite == "raise":
                raise FloatingPointError(msg)
            self._warn_once("nonfinite", msg + " (warned once)")

    def _step_bucket(self, bucket: Bucket) -> None:
        x = self._stack(bucket)
        if x is None:
            return
        ps, A, B, s, present = x.pairs, x.A, x.B, x.s, x.present
        gradA, gradB = x.gradA, x.gradB
        ok = self._finite(gradA, gradB) & present
        self._check_nonfinite(ok, present, ps)
        if not bool(ok.any()):
            return
        if not bool(ok.all()):
            zero = torch.zeros((), dtype=A.dtype, device=A.device)
            gradA = torch.where(ok[:, None, None], gradA, zero)
            gradB = torch.where(ok[:, None, None], gradB, zero)
        st = bucket.state
        ctx = StepContext(A, B, gradA, gradB, s, st["step"] + ok.to(st["step"].dtype), ok, bucket)
        directions = self._directions(ctx)
        if directions is None:  # the subclass found a problem it already reported
            return
        ok = ctx.ok  # a subclass may narrow it (non-finite energies)
        skipped = None if bool(ok.all()) else (~ok).nonzero().flatten()
        saved = None if skipped is None else {name: t[skipped].clone() for name, t in st.items()}
        st["step"].copy_(ctx.step)
        for name, value in ctx.updates.items():
            st[name].copy_(value)
        self._apply_(bucket, A, B, directions[0], directions[1], s, ctx.step)
        if saved is not None:  # pairs that must not move get their old state back
            for name, value in saved.items():
                st[name][skipped] = value
        self._write_back(bucket, ps, ok, A, B)

    def _apply_(self, bucket: Bucket, A, B, dA, dB, s, step) -> None:
        """Update the stacked factors A, B and the bucket's state in place (spec 3.5)."""
        g = bucket.group
        F.factor_step_(A, B, dA, dB, bucket.state, step, variant=self.variant, lr=g["lr"], betas=g["betas"],
                       eps=g["eps"], weight_decay=g["weight_decay"], momentum=g.get("momentum", 0.0),
                       sgd_scale=self._sgd_scale(s), rebalance_sgd=self._rebalance_sgd)

    def _write_back(self, bucket: Bucket, ps, ok, A, B) -> None:
        """Copy the new stacked factors A, B into the parameters of the pairs that were updated
        (pairs of a bucket share their exact shapes, so one foreach copy does it)."""
        k = len(ps)
        A_new = A.view((k,) + tuple(ps[0].A.shape)).unbind(0)
        B_new = B.view((k,) + tuple(ps[0].B.shape)).unbind(0)
        targets = range(k) if bool(ok.all()) else ok.nonzero().flatten().tolist()
        dst = [ps[j].A for j in targets] + [ps[j].B for j in targets]
        src = [A_new[j] for j in targets] + [B_new[j] for j in targets]
        torch._foreach_copy_(dst, src)  # casts back to the parameters' dtype

    # -- parameters outside pairs: plain AdamW ---------------------------------------------
    def _other_params(self, group: dict) -> list:
        pair_ids = getattr(self, "_pair_param_ids", None)
        if pair_ids is None:
            pair_ids = self._pair_param_ids = {id(t) for p in self.pairs for t in (p.A, p.B)}
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
