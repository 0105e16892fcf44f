"""A kohya sd-scripts style LoRA network on a tiny text encoder and UNet, built in code.

kohya's trainers (sd-scripts `train_network.py`, musubi-tuner) are not on the package index, so the
tests rebuild the parameter layout they hand to `optimizer_class(params, lr=..., **kwargs)`:

- a `LoRAModule` per adapted Linear / Conv2d, with `lora_down` registered before `lora_up`
  ((r, in) or (r, in, kh, kw), then (out, r) or (out, r, 1, 1)), alpha in a buffer, and
  `scale = alpha / r` applied to the up output together with the network `multiplier`; the
  original layer's forward is replaced, not the layer;
- `LoRANetwork.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)`: one group per part
  (text encoder first, then UNet) with its own lr and, with a LoRA+ ratio, each part split into a
  group of everything but `lora_up` and a "plus" group of `lora_up` weights at lr * ratio; a group
  whose lr is 0 or None is left out (as kohya logs "NO LR skipping!"); with block lr weights
  (`set_block_lr_weight`, kohya's `--network_args down_lr_weight=...`) the UNet part is one group
  (and one "plus" group) per block at unet_lr * weight, a block of weight 0 left out. A block here is
  one adapted UNet layer (kohya groups the layers of a UNet block).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class LoRAModule(nn.Module):
    """kohya's LoRA module: W x + multiplier * scale * up(down(x)), scale = alpha / r."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float = 1.0):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        if isinstance(org_module, nn.Conv2d):
            self.lora_down = nn.Conv2d(org_module.in_channels, lora_dim, org_module.kernel_size, org_module.stride,
                                       org_module.padding, bias=False)
            self.lora_up = nn.Conv2d(lora_dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
        else:
            self.lora_down = nn.Linear(org_module.in_features, lora_dim, bias=False)
            self.lora_up = nn.Linear(lora_dim, org_module.out_features, bias=False)
        alpha = lora_dim if not alpha else alpha
        self.scale = alpha / lora_dim
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.org_module = [org_module]  # a list: not a submodule, its weight stays out of parameters()

    def apply_to(self) -> None:
        org = self.org_module[0]
        self.org_forward = org.forward
        org.forward = self.forward

    def forward(self, x):
        return self.org_forward(x) + self.lora_up(self.lora_down(x)) * self.multiplier * self.scale


class LoRANetwork(nn.Module):
    """LoRA on every Linear of the text encoder and every Linear/Conv2d of the UNet."""

    def __init__(self, text_encoder: nn.Module, unet: nn.Module, lora_dim: int = 4, alpha: float = 1.0,
                 multiplier: float = 1.0, loraplus_lr_ratio: Optional[float] = None):
        super().__init__()
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.block_lr_weight: Optional[list] = None

        def create(prefix, root):
            return [LoRAModule(f"{prefix}_{name.replace('.', '_')}", module, multiplier, lora_dim, alpha)
                    for name, module in root.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]

        self.text_encoder_loras = create("lora_te", text_encoder)
        self.unet_loras = create("lora_unet", unet)
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()
            self.add_module(lora.lora_name, lora)

    def set_block_lr_weight(self, block_lr_weight: Optional[list]) -> None:
        """One lr weight per UNet LoRA layer (kohya: per UNet block)."""
        self.block_lr_weight = block_lr_weight

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        """The param groups and their descriptions, in kohya's order and split."""
        self.requires_grad_(True)
        all_params, descriptions = [], []

        def assemble(loras, lr, ratio, label):
            split = {"lora": {}, "plus": {}}
            for lora in loras:
                for name, param in lora.named_parameters():
                    key = "plus" if ratio is not None and "lora_up" in name else "lora"
                    split[key][f"{lora.lora_name}.{name}"] = param
            for key, named in split.items():
                group = {"params": named.values()}  # kohya hands over a dict view, not a list
                if not named:
                    continue
                if lr is not None:
                    group["lr"] = lr * ratio if key == "plus" else lr
                if not group.get("lr"):
                    continue  # kohya: "NO LR skipping!"
                all_params.append(group)
                descriptions.append(label + (" plus" if key == "plus" else ""))

        ratio = self.loraplus_lr_ratio
        if self.text_encoder_loras:
            assemble(self.text_encoder_loras, text_encoder_lr if text_encoder_lr is not None else default_lr,
                     ratio, "textencoder")
        if self.unet_loras and self.block_lr_weight is not None:
            for idx, lora in enumerate(self.unet_loras):
                lr = (unet_lr if unet_lr is not None else default_lr) * self.block_lr_weight[idx]
                assemble([lora], lr, ratio, f"unet_block{idx}")
        elif self.unet_loras:
            assemble(self.unet_loras, unet_lr if unet_lr is not None else default_lr, ratio, "unet")
        return all_params, descriptions


class TinyTextEncoder(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 24)
        self.fc2 = nn.Linear(24, dim)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids)))).mean(1)


class TinyUNet(nn.Module):
    def __init__(self, channels: int = 4, dim: int = 16):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, 12, 3, padding=1)
        self.proj = nn.Linear(dim, 12)
        self.conv_out = nn.Conv2d(12, channels, 1)

    def forward(self, x, cond):
        h = torch.relu(self.conv_in(x) + self.proj(cond)[:, :, None, None])
        return self.conv_out(h)


def tiny_kohya_setup(seed: int = 0, lora_dim: int = 4, alpha: float = 2.0, loraplus_lr_ratio: Optional[float] = None):
    """(text_encoder, unet, network), base weights frozen, lora_up drawn small instead of zero so
    both factors get gradients from the first step."""
    torch.manual_seed(seed)
    te, unet = TinyTextEncoder(), TinyUNet()
    te.requires_grad_(False)
    unet.requires_grad_(False)
    network = LoRANetwork(te, unet, lora_dim=lora_dim, alpha=alpha, loraplus_lr_ratio=loraplus_lr_ratio)
    with torch.no_grad():
        for lora in network.text_encoder_loras + network.unet_loras:
            lora.lora_up.weight.normal_(0, 0.05)
    return te, unet, network


def kohya_batch(seed: int, n: int = 8):
    """Token ids, a noisy latent and the target the LoRA should learn (a fixed function of both)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (n, 5), generator=g)
    x = torch.randn(n, 4, 6, 6, generator=g)
    target = 0.5 * x.roll(1, dims=1) + (ids.float().mean(1) / 32)[:, None, None, None]
    return ids, x, target


def kohya_loss(te, unet, seed: int) -> torch.Tensor:
    ids, x, target = kohya_batch(seed)
    return ((unet(x, te(ids)) - target) ** 2).mean()
