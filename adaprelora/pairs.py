"""LoRA pair discovery: find each adapted layer's (A, B, scaling) by module, never by list order."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn


@dataclass(eq=False)
class LoraPair:
    """One adapted layer, `W_eff = W0 + s * B @ A`.

    `A` is (r, n) or a conv weight (r, in, kh, kw) viewed as (r, in*kh*kw); `B` is (m, r) or
    (m, r, 1, 1). `module` is the PEFT LoRA layer (None for pairs given as tuples), whose
    `scaling[adapter]` is read at every step so `set_scale` and rsLoRA are honoured.
    """

    name: str
    A: nn.Parameter
    B: nn.Parameter
    scale: float = 1.0
    module: Optional[nn.Module] = None
    adapter: Optional[str] = None
    lora_A_module: Optional[nn.Module] = field(default=None, repr=False)
    lora_B_module: Optional[nn.Module] = field(default=None, repr=False)

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def m(self) -> int:
        return self.B.shape[0]

    @property
    def n(self) -> int:
        return self.A[0].numel()

    @property
    def is_conv(self) -> bool:
        return self.A.dim() == 4

    def scaling(self) -> float:
        if self.module is not None and self.adapter is not None:
            return float(self.module.scaling[self.adapter])
        return float(self.scale)

    def bucket_key(self) -> tuple:
        """Pairs with equal keys are stacked into one batched solve."""
        return (self.A.device, self.A.dtype, tuple(self.A.shape), tuple(self.B.shape))


def _check_shapes(name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    if A.dim() not in (2, 4) or B.dim() not in (2, 4):
        raise ValueError(f"LoRA pair {name!r}: A and B must be 2-D (Linear) or 4-D (Conv2d) tensors")
    if B.dim() == 4 and tuple(B.shape[2:]) != (1, 1):
        raise ValueError(f"LoRA pair {name!r}: a conv B must be (out, r, 1, 1), got {tuple(B.shape)}")
    if A.shape[0] != B.shape[1]:
        raise ValueError(
            f"LoRA pair {name!r}: rank mismatch, A is {tuple(A.shape)} and B is {tuple(B.shape)} "
            "(need A.shape[0] == B.shape[1])"
        )


def find_lora_pairs(model: nn.Module) -> list[LoraPair]:
    """All trainable LoRA pairs of `model`'s active adapters, sorted by module name.

    Works for PEFT models, diffusers models with the PEFT backend (`unet.add_adapter`) and
    transformers models with adapters: every PEFT `LoraLayer` on Linear or Conv2d. Skipped on
    purpose (they are left to plain AdamW by the optimizers): embedding LoRA, DoRA magnitudes,
    frozen or inactive adapters.
    """
    from peft.tuners.lora import LoraLayer

    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A or adapter not in module.lora_B:
                continue
            lora_A, lora_B = module.lora_A[adapter], module.lora_B[adapter]
            A, B = getattr(lora_A, "weight", None), getattr(lora_B, "weight", None)
            if not isinstance(A, nn.Parameter) or not isinstance(B, nn.Parameter):
                continue
            if not (A.requires_grad and B.requires_grad):
                continue
            if not isinstance(lora_A, (nn.Linear, nn.Conv2d)) or not isinstance(lora_B, (nn.Linear, nn.Conv2d)):
                continue
            if getattr(lora_A, "groups", 1) != 1:
                continue
            _check_shapes(name, A, B)
            pairs.append(LoraPair(f"{name}.{adapter}", A, B, module=module, adapter=adapter,
                                  lora_A_module=lora_A, lora_B_module=lora_B))
    return sorted(pairs, key=lambda p: p.name)


def pairs_from_tuples(items: Iterable) -> list[LoraPair]:
    """`[(A, B, scale), ...]` -> LoraPairs named by position, for nameless parameter lists."""
    pairs = []
    for i, item in enumerate(items):
        if len(item) != 3:
            raise ValueError(f"pairs[{i}] must be (A, B, scale), got {len(item)} items")
        A, B, scale = item
        _check_shapes(f"pairs[{i}]", A, B)
        pairs.append(LoraPair(f"pairs[{i}]", A, B, scale=float(scale)))
    return pairs


def bind_pair_modules(pairs: list[LoraPair], models: Iterable[nn.Module], adopt_scale: bool = True) -> None:
    """Give pairs found in a parameter list the modules that hold their tensors (matched by
    identity), so exact-energy hooks can be placed: the Linear/Conv2d whose weight is A (PEFT's
    `lora_A[adapter]`, kohya's `lora_down`) and the one whose weight is B. With `adopt_scale`, a
    pair inside a PEFT LoraLayer reads that layer's live `scaling[adapter]` from then on."""
    models = list(models)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError("attach() takes the model(s) holding the LoRA layers, e.g. attach(model) or attach(unet, text_encoder)")
    holder: dict[int, nn.Module] = {}
    peft: dict[int, tuple] = {}
    embedding: set[int] = set()  # PEFT's embedding LoRA: AdaPreLoRA(model) leaves it to AdamW
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        LoraLayer = ()
    for model in models:
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and isinstance(getattr(module, "weight", None), nn.Parameter):
                holder.setdefault(id(module.weight), module)
            if LoraLayer and isinstance(module, LoraLayer):
                for adapter, lora_A in module.lora_A.items():
                    weight = getattr(lora_A, "weight", None)
                    if weight is not None:
                        peft[id(weight)] = (module, adapter)
                embedding.update(id(t) for d in (module.lora_embedding_A, module.lora_embedding_B) for t in d.values())
    missing = [p.name for p in pairs if id(p.A) not in holder or id(p.B) not in holder]
    if any(id(p.A) in embedding for p in pairs):
        raise ValueError(
            "attach(): the pairs found by order include PEFT embedding LoRA factors (lora_embedding_A/B), which "
            "have no layer to hook; build the optimizer from model.named_parameters() (pairs_from='names'), "
            "which leaves them to AdamW as AdaPreLoRA(model) does")
    if missing:
        raise ValueError(
            f"attach(): the tensors of LoRA pair(s) {missing[:3]}{' ...' if len(missing) > 3 else ''} are not the "
            "weights of a Linear or Conv2d in the model(s) given: pass every model that holds them, e.g. "
            "attach(unet, text_encoder)")
    for p in pairs:
        p.lora_A_module, p.lora_B_module = holder[id(p.A)], holder[id(p.B)]
        if adopt_scale and id(p.A) in peft:
            p.module, p.adapter = peft[id(p.A)]
