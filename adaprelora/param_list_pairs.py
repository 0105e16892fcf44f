"""LoRA pairs from a bare parameter list, for trainers that build the optimizer as
`optimizer_class(params_or_groups, lr=..., **kwargs)` with no model (kohya sd-scripts,
musubi-tuner, diffusers' example scripts, the transformers/TRL Trainer).

Two readings (`pairs_from=`):

- "names": `(name, tensor)` items (`model.named_parameters()`); `lora_A` pairs with the `lora_B`
  of the same name, `lora_down` with `lora_up`. Order does not matter. The default for named lists.
- "order": the layout the trainers produce. Within a param group, a down/A factor (r, in) or
  (r, in, kh, kw) directly followed by its up/B factor (out, r) or (out, r, 1, 1) is a pair (kohya
  and LyCORIS modules register `lora_down` before `lora_up`, PEFT `lora_A` before `lora_B`); k down
  factors of one rank directly followed by k matching up factors pair by position (a layer whose
  LoRA is split into q/k/v parts, or a PEFT layer with several trainable adapters). A group
  left with only down factors followed by a group with only up factors of matching ranks (kohya's
  LoRA+ groups; groups left with no factor, e.g. empty ones, in between do not count) is paired by
  position. The default for unnamed lists.
- "none": no discovery; only `pairs=[(A, B, scale), ...]`.

Frozen tensors are never paired. Everything not paired gets plain AdamW, except a tensor shaped
like a factor of a rank already in use that found no partner: that is a `ValueError` naming it
(a missing partner or an order this module does not know would otherwise train it silently as a
plain tensor). A down-shaped weight directly followed by its bias is taken for an ordinary layer. The LoRA scale is not in the list (kohya keeps alpha in a buffer): it is
`lora_scale` (a float, or one per pair) or 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch

from .pairs import LoraPair, _check_shapes

PAIRS_FROM = ("order", "names", "none")
_A_SEGMENTS = {"lora_A": "lora_B", "lora_down": "lora_up"}
_B_SEGMENTS = {b: a for a, b in _A_SEGMENTS.items()}
_WHAT_TO_PASS = (
    "pass model.named_parameters() with pairs_from='names', or the pairs themselves with "
    "pairs=[(A, B, scale), ...] (pairs_from='none'), or the model: AdaPreLoRA(model, ...)"
)

_NO_PAIR = {
    "order": ("found no trainable LoRA pair in the parameter list, read by order: it needs each adapted layer's "
              "lora_down/lora_A (r, in) directly followed by its lora_up/lora_B (out, r), both trainable (frozen "
              "tensors are never paired); " + _WHAT_TO_PASS),
    "names": ("found no trainable LoRA pair in the parameter list, read by names: it needs trainable tensors "
              "named ...lora_A... and ...lora_B... (or lora_down / lora_up), as model.named_parameters() gives "
              "for PEFT and kohya-style layers; pass the pairs themselves with pairs=[(A, B, scale), ...] "
              "(pairs_from='none'), or the model: AdaPreLoRA(model, ...)"),
}


@dataclass
class _Entry:
    """One tensor of the list: where it is (flat index, group, position in the group) and its name."""

    index: int
    group: int
    position: int
    tensor: torch.Tensor
    name: Optional[str] = None

    def where(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        return (f"tensor {self.index}{name} (param group {self.group}, position {self.position}, "
                f"shape {tuple(self.tensor.shape)})")


def _normalise(params) -> tuple[list, list[list[_Entry]], bool]:
    """Materialise `params` (tensors, (name, tensor) items or param-group dicts, possibly generators)
    into the list torch's Optimizer receives, plus the entries per group and whether they are named."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or param groups, got a single tensor")
    items = list(params)
    if items and all(isinstance(g, dict) for g in items):
        groups = []
        for g in items:
            if "params" not in g:
                raise ValueError("each param group needs a 'params' entry")
            ps = g["params"]
            groups.append(dict(g, params=[ps] if isinstance(ps, torch.Tensor) else list(ps)))
        out, members = groups, [g["params"] for g in groups]
    elif any(isinstance(g, dict) for g in items):
        raise TypeError("params mixes param-group dicts with tensors: pass either tensors or groups")
    else:
        out, members = items, [items]
    entries, named_any, unnamed_any, flat, seen = [], False, False, 0, {}
    for gi, group in enumerate(members):
        row = []
        for pos, item in enumerate(group):
            name = None
            if isinstance(item, tuple):
                if len(item) != 2 or not isinstance(item[1], torch.Tensor):
                    raise ValueError(f"item {flat} of the parameter list must be a tensor or a (name, tensor) "
                                     f"pair, got a tuple of {len(item)}")
                name, item = str(item[0]), item[1]
                named_any = True
            else:
                unnamed_any = True
            entry = _Entry(flat, gi, pos, item, name)
            if id(item) in seen:
                raise ValueError(f"{entry.where()} is the same tensor as {seen[id(item)].where()}: "
                                 "pass each parameter once")
            seen[id(item)] = entry
            row.append(entry)
            flat += 1
        entries.append(row)
    if named_any and unnamed_any:
        raise ValueError("some items of the parameter list are (name, tensor) pairs and some bare tensors: "
                         "pass model.named_parameters() whole, or bare tensors only")
    return out, entries, named_any


# -- shapes ---------------------------------------------------------------------------------------
def _down_rank(t: torch.Tensor) -> Optional[int]:
    """r if `t` can be a down/A factor (r, in) or (r, in, kh, kw) with r below its fan-in."""
    if t.dim() in (2, 4) and t.shape[0] < math.prod(t.shape[1:]):
        return int(t.shape[0])
    return None


def _up_rank(t: torch.Tensor) -> Optional[int]:
    """r if `t` can be an up/B factor (out, r) or (out, r, 1, 1) with r below out."""
    if (t.dim() == 2 or (t.dim() == 4 and tuple(t.shape[2:]) == (1, 1))) and t.shape[1] < t.shape[0]:
        return int(t.shape[1])
    return None


def _fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`a` a down factor and `b` an up factor of the same rank (an up factor may have out <= r,
    e.g. a rank-8 LoRA on a 4-channel conv_out: the down factor's r < fan-in is what rules out
    ordinary square or widening weights)."""
    r = _down_rank(a)
    if r is None or a.dim() != b.dim() or b.shape[1] != r:
        return False
    return b.dim() == 2 or tuple(b.shape[2:]) == (1, 1)


def _run_of_downs(row: list[_Entry], i: int) -> int:
    """How many down-factor-shaped tensors of one rank start at row[i]."""
    r = _down_rank(row[i].tensor)
    k = 0
    while r is not None and i + k < len(row) and _down_rank(row[i + k].tensor) == r:
        k += 1
    return k


# -- the two readings -----------------------------------------------------------------------------
def _pairs_by_order(entries: list[list[_Entry]]) -> list[tuple[_Entry, _Entry]]:
    found: list[tuple[_Entry, _Entry]] = []
    used: set[int] = set()
    trainable = [[e for e in row if e.tensor.requires_grad] for row in entries]
    for row in trainable:  # down then up, within a group
        i = 0
        while i < len(row):
            k = _run_of_downs(row, i)
            downs, ups = row[i:i + k], row[i + k:i + 2 * k]
            if k > 1 and len(ups) == k and all(_fits(a.tensor, b.tensor) for a, b in zip(downs, ups)):
                # k downs then their k ups: a layer split into parts, or k trainable adapters
                found.extend(zip(downs, ups))
                used.update(e.index for e in row[i:i + 2 * k])
                i += 2 * k
                continue
            e = row[i]
            nxt = row[i + 1] if i + 1 < len(row) else None
            if nxt is not None and _fits(e.tensor, nxt.tensor):
                found.append((e, nxt))
                used.update((e.index, nxt.index))
                i += 2
                continue
            r = _up_rank(e.tensor)
            if r is not None and nxt is not None and _down_rank(nxt.tensor) == r and e.tensor.dim() == nxt.tensor.dim():
                raise ValueError(
                    f"{e.where()} looks like an up/B factor (out, r) placed before a down/A factor "
                    f"({nxt.where()}): reading pairs by order needs each module's lora_down/lora_A "
                    f"before its lora_up/lora_B (this is not a layout known to hold LoRA pairs: "
                    f"LoHa, LoKr and other non-LoRA adapters are not supported); {_WHAT_TO_PASS}")
            i += 1
    # a group of down factors followed by a group of up factors (LoRA+): by position
    left = [[e for e in row if e.index not in used and e.tensor.dim() in (2, 4)] for row in trainable]
    kept = [g for g, row in enumerate(left) if row]  # groups with nothing left over (empty, 1-D only) skipped
    for g, h in zip(kept, kept[1:]):
        downs, ups = left[g], left[h]
        if downs and len(downs) == len(ups) and all(_fits(a.tensor, b.tensor) for a, b in zip(downs, ups)):
            found.extend(zip(downs, ups))
            used.update(e.index for e in downs + ups)
            left[g], left[h] = [], []
    ranks = {int(a.tensor.shape[0]) for a, _ in found}
    # a weight directly followed by its bias is an ordinary layer (a classifier head of r labels):
    # no down/A factor has a bias in PEFT, kohya or LyCORIS
    biased = {row[i].index for row in trainable for i in range(len(row) - 1)
              if row[i + 1].tensor.dim() == 1 and row[i + 1].tensor.shape[0] == row[i].tensor.shape[0]}
    for row in left:
        for e in row:
            down_like = _down_rank(e.tensor) in ranks and e.index not in biased
            if e.index not in used and (down_like or _up_rank(e.tensor) in ranks):
                raise ValueError(
                    f"{e.where()} has the shape of a rank-{_down_rank(e.tensor) or _up_rank(e.tensor)} LoRA "
                    f"factor but no partner in the order the trainers use (each lora_down/lora_A directly "
                    f"followed by its lora_up/lora_B, or LoRA+ groups of down factors followed by groups of "
                    f"up factors); {_WHAT_TO_PASS}")
    found.sort(key=lambda ab: ab[0].index)
    return found


def _split_name(name: str) -> Optional[tuple[str, str]]:
    """('A' or 'B', the pair key) if `name` has a lora_A/lora_B/lora_down/lora_up segment."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in _A_SEGMENTS or part in _B_SEGMENTS:
            side = "A" if part in _A_SEGMENTS else "B"
            family = part if side == "A" else _B_SEGMENTS[part]
            return side, ".".join(parts[:i] + [family] + parts[i + 1:])
    return None


def _pairs_by_name(entries: list[list[_Entry]]) -> list[tuple[_Entry, _Entry]]:
    sides: dict[str, dict[str, _Entry]] = {}
    for row in entries:
        for e in row:
            split = _split_name(e.name) if e.tensor.requires_grad and e.tensor.dim() in (2, 4) else None
            if split is not None:
                sides.setdefault(split[1], {})[split[0]] = e
    found = []
    for ab in sides.values():
        if "A" not in ab or "B" not in ab:
            e = next(iter(ab.values()))
            missing = "lora_B/lora_up" if "B" not in ab else "lora_A/lora_down"
            raise ValueError(f"{e.where()} is a LoRA factor whose trainable {missing} partner is not in the "
                             "parameter list: pass both factors of every adapted layer (or freeze both)")
        found.append((ab["A"], ab["B"]))
    found.sort(key=lambda ab: ab[0].index)
    return found


def _pair_name(a: _Entry, b: _Entry) -> str:
    if a.name is not None:
        parts = [p for p in a.name.split(".") if p not in _A_SEGMENTS]
        return ".".join(parts[:-1] if parts and parts[-1] == "weight" else parts)
    if a.group == b.group:
        return f"param_groups[{a.group}][{a.position},{b.position}]"
    return f"param_groups[{a.group}][{a.position}]+param_groups[{b.group}][{b.position}]"


def pairs_from_param_list(params: Iterable, pairs_from: Optional[str] = None,
                          lora_scale: Union[None, float, Sequence[float]] = None) -> tuple[list, list[LoraPair]]:
    """Find the LoRA pairs of a parameter list (see the module docstring).

    Returns `(params, pairs)`: `params` materialised (generators are consumed) for torch's
    Optimizer, and the pairs in list order (by their A factor). `pairs_from` None picks "names"
    for `(name, tensor)` items, else "order". A reading that finds no pair is a ValueError.
    """
    if pairs_from is not None and pairs_from not in PAIRS_FROM:
        raise ValueError(f"pairs_from must be one of {', '.join(map(repr, PAIRS_FROM))} or None, got {pairs_from!r}")
    out, entries, named = _normalise(params)
    mode = pairs_from or ("names" if named else "order")
    if mode == "none":
        return out, []
    if mode == "names" and not named:
        raise ValueError("pairs_from='names' needs (name, tensor) items: pass model.named_parameters() "
                         "(or param groups whose 'params' are such items)")
    found = _pairs_by_name(entries) if mode == "names" else _pairs_by_order(entries)
    if not found:
        raise ValueError(_NO_PAIR[mode])
    scales = _scales(lora_scale, len(found))
    pairs = []
    for (a, b), s in zip(found, scales):
        name = _pair_name(a, b)
        _check_shapes(name, a.tensor, b.tensor)
        pairs.append(LoraPair(name, a.tensor, b.tensor, scale=s))
    return out, pairs


def _scales(lora_scale, k: int) -> list[float]:
    if lora_scale is None:
        return [1.0] * k
    if isinstance(lora_scale, (int, float)):
        values = [float(lora_scale)] * k
    else:
        values = [float(s) for s in lora_scale]
        if len(values) != k:
            raise ValueError(f"lora_scale has {len(values)} values but {k} LoRA pairs were found: give one "
                             "float for all, or one per pair in the order of optimizer.pairs")
    bad = [s for s in values if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ValueError(f"lora_scale must be positive and finite, got {bad[0]}")
    return values


def list_pairs(params: Iterable, pairs=None, pairs_from: Optional[str] = None,
               lora_scale: Union[None, float, Sequence[float]] = None) -> tuple[list, list[LoraPair]]:
    """What `LoRAPairOptimizer` does with a parameter list: the explicit `pairs=` if given, else
    `pairs_from_param_list`."""
    from .pairs import pairs_from_tuples

    if pairs is not None:
        if pairs_from not in (None, "none") or lora_scale is not None:
            raise ValueError("pairs=[(A, B, scale), ...] names the pairs and their scales itself: "
                             "leave pairs_from and lora_scale out")
        return params, pairs_from_tuples(pairs)
    return pairs_from_param_list(params, pairs_from, lora_scale)
