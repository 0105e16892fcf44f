"""Tiny PEFT LoRA models for the optimizer tests and benchmarks (in the spirit of PEFT's SimpleNet)."""
import torch
from peft import LoraConfig, get_peft_model
from torch import nn


class SimpleNet(nn.Module):
    """Embedding, LayerNorm, two Linear layers and a Conv2d: every kind of tensor the optimizer meets."""

    def __init__(self, vocab=20, dim=12, hidden=16, out=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.lin0 = nn.Linear(dim, hidden)
        self.lin1 = nn.Linear(hidden, out)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, ids, img=None):
        h = self.lin1(torch.relu(self.lin0(self.norm(self.emb(ids))))).mean(1)
        if img is not None:
            h = h + self.conv(img).mean((1, 2, 3))[:, None]
        return h


def make_lora_model(seed=0, r=4, alpha=8, targets=("lin0", "lin1", "conv"), dtype=torch.float32,
                    modules_to_save=None, init_B_random=True, use_rslora=False):
    torch.manual_seed(seed)
    model = get_peft_model(SimpleNet(), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                   lora_dropout=0.0, modules_to_save=modules_to_save,
                                                   use_rslora=use_rslora))
    if init_B_random:  # B = 0 at PEFT's init hides most maths; start from a generic point
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return model.to(dtype)


def batch(seed=0, n=8, seq=5, with_img=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (n, seq), generator=g)
    img = torch.randn(n, 3, 6, 6, generator=g) if with_img else None
    y = torch.randn(n, 6, generator=g)
    return ids, img, y


def forward_backward(model, seed=0, with_img=True, scale=1.0):
    ids, img, y = batch(seed, with_img=with_img)
    dtype = next(model.parameters()).dtype
    out = model(ids, None if img is None else img.to(dtype))
    loss = ((out.float() - y) ** 2).mean() * scale
    loss.backward()
    return loss.detach()
