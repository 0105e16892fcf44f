"""Optimizer step time, whole train-step time and optimizer state bytes, for every optimizer name.

Sets of LoRA pairs:
  sd15  the 128 attention projections of Stable Diffusion 1.5's UNet: q, k, v, out of self- and
        cross-attention in 16 transformer blocks at widths 320/640/1280 (5/5/6 blocks), cross-
        attention k/v reading the 768-wide text states; r = 4 and 16.
  llama one Llama-7B-shaped decoder block: q, k, v, o (4096 x 4096), gate, up (11008 x 4096),
        down (4096 x 11008); r = 8.

The "train step" runs every adapted projection on random activations that require grad (as inside
a real network, so backward also forms input gradients), then backward, then step. Token counts
are flags: CPU defaults are small, the GPU numbers belong to benchmarks/triton_kernels.py.
Every optimizer gets its own copy of the model and all are timed in interleaved rounds (medians),
so load from other processes falls on each alike and the "x AdamW" ratios hold within one run.

    python benchmarks/optimizer_step.py                 # full table, JSON to benchmarks/results/
    python benchmarks/optimizer_step.py --quick         # fewer repeats, sd15 r=16 only
    python benchmarks/optimizer_step.py --quick --optimizers adaprelora@0 adaprelora@2 adaprelora@4 adaprelora@8
                                                        # CPU bucket runs of 2/4/8 MiB against whole buckets
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from adaprelora import available_optimizers, create_optimizer


def sd15_shapes():
    """(name, in_features, out_features, tokens_kind) of the 128 SD 1.5 attention projections."""
    widths = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
    shapes = []
    for b, c in enumerate(widths):
        for proj in ("q", "k", "v", "out"):
            shapes.append((f"b{b}_attn1_{proj}", c, c, "image"))
        shapes += [(f"b{b}_attn2_q", c, c, "image"), (f"b{b}_attn2_k", 768, c, "text"),
                   (f"b{b}_attn2_v", 768, c, "text"), (f"b{b}_attn2_out", c, c, "image")]
    assert len(shapes) == 128
    return shapes


def llama_shapes():
    h, f = 4096, 11008
    return [(n, h, h, "image") for n in ("q", "k", "v", "o")] + [("gate", h, f, "image"), ("up", h, f, "image"),
                                                               ("down", f, h, "image")]


class Projections(nn.Module):
    """Independent Linear layers standing in for a network's adapted projections."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes = shapes
        self.layers = nn.ModuleDict({name: nn.Linear(i, o, bias=False) for name, i, o, _ in shapes})

    def forward(self, inputs):
        return sum(self.layers[name](inputs[name]).float().pow(2).mean() for name, *_ in self.shapes)


def build(shapes, r, seed=0):
    torch.manual_seed(seed)
    model = Projections(shapes)
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=[n for n, *_ in shapes]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=1e-3)  # a step past PEFT's B = 0 start, the steady state
    return model


def make_inputs(shapes, tokens, text_tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(text_tokens if kind == "text" else tokens, i, generator=g).requires_grad_(True)
            for name, i, _, kind in shapes}


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def interleaved_medians(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of each function, timed in rounds that call every function once, so load
    from other processes falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def make_optimizer(name, model, lr=1e-4):
    """An optimizer by factory name, or "torch-adamw-foreach", or "NAME@MiB": NAME with its CPU
    bucket runs capped at MiB of stacked factors and gradients ("@0": whole buckets)."""
    if "@" in name:
        base, mib = name.split("@")
        opt = make_optimizer(base, model, lr)
        opt.CPU_BUCKET_BYTES = int(float(mib) * 2 ** 20) if float(mib) > 0 else 2 ** 62
        return opt
    if name == "torch-adamw-foreach":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, foreach=True)
    kwargs = {"stats": "tangent"} if name == "adaprelora-tangent" else {}
    if name == "prodigy":
        lr = 1.0  # its documented lr: a multiplier of its own step-size estimate
    return create_optimizer("adaprelora" if name == "adaprelora-tangent" else name, model, lr=lr, **kwargs)


def bench_set(set_name, shapes, r, names, tokens, text_tokens, repeats, train_step=True):
    """step() alone and the whole train step of every optimizer, each on its own copy of the
    model, timed in interleaved rounds (`interleaved_medians`)."""
    inputs = make_inputs(shapes, tokens, text_tokens)
    step_fns, train_fns, opts = {}, {}, {}
    for name in names:
        model = build(shapes, r)
        opt = make_optimizer(name, model)

        def fwd_bwd(model=model):
            model(inputs).backward()

        fwd_bwd()
        opt.step()  # state exists from here on

        # step() alone, on one set of gradients: the exact energies the hooks gathered are put
        # back before each call (a step consumes them), so no backward runs inside the loop
        opt.zero_grad()
        fwd_bwd()
        collector = getattr(opt, "_collector", None)
        saved = None if collector is None else ([r.clone() for r in collector.rows], [c.clone() for c in collector.cols])

        def step_only(opt=opt, collector=collector, saved=saved):
            if saved is not None:
                collector.rows, collector.cols = list(saved[0]), list(saved[1])
            opt.step()

        def train_fn(opt=opt, fwd_bwd=fwd_bwd):
            opt.zero_grad()
            fwd_bwd()
            opt.step()

        step_fns[name], train_fns[name], opts[name] = step_only, train_fn, (opt, model)
    step_t = interleaved_medians(step_fns, max(repeats, 5))
    for opt, _ in opts.values():  # the train step starts from fresh gradients
        opt.zero_grad()
    train_t = interleaved_medians(train_fns, repeats) if train_step else {name: float("nan") for name in train_fns}
    rows = []
    for name, (opt, model) in opts.items():
        pairs = sum(1 for n, _ in model.named_parameters() if "lora_A" in n)
        rows.append(dict(set=set_name, r=r, optimizer=name, step_ms=step_t[name] * 1e3,
                         train_step_ms=train_t[name] * 1e3, state_bytes=state_bytes(opt), pairs=pairs))
        if hasattr(opt, "remove_hooks"):
            opt.remove_hooks()
        print(f"  {set_name:6s} r={r:<3d} {name:20s} step {step_t[name] * 1e3:9.2f} ms   train step "
              f"{train_t[name] * 1e3:9.1f} ms   state {state_bytes(opt) / 2**20:8.2f} MiB", flush=True)
    ref = next(row for row in rows if row["optimizer"] == "torch-adamw-foreach")
    for row in rows:
        row["step_vs_adamw"] = row["step_ms"] / ref["step_ms"]
        row["train_vs_adamw"] = row["train_step_ms"] / ref["train_step_ms"]
        row["extra_state_floats"] = (row["state_bytes"] - ref["state_bytes"]) / 4
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="sd15 at r=16 only, fewer repeats")
    ap.add_argument("--sets", nargs="+", default=None, choices=["sd15", "llama"])
    ap.add_argument("--optimizers", nargs="+", default=None)
    ap.add_argument("--tokens", type=int, default=128, help="image/sequence tokens per projection")
    ap.add_argument("--text_tokens", type=int, default=77, help="tokens of the cross-attention k/v inputs")
    ap.add_argument("--llama_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no_train_step", action="store_true", help="time step() alone (the train step is the slow part)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "optimizer_step.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.optimizers or ["torch-adamw-foreach"] + available_optimizers() + ["adaprelora-tangent"]
    if "torch-adamw-foreach" not in names:
        names = ["torch-adamw-foreach"] + names
    repeats = args.repeats or (3 if args.quick else 5)
    configs = []
    sets = args.sets or (["sd15"] if args.quick else ["sd15", "llama"])
    if "sd15" in sets:
        configs += [("sd15", sd15_shapes(), r, args.tokens) for r in ((16,) if args.quick else (4, 16))]
    if "llama" in sets:
        configs.append(("llama", llama_shapes(), 8, args.llama_tokens))
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"# optimizer_step on {machine}")
    rows = []
    for set_name, shapes, r, tokens in configs:
        rows += bench_set(set_name, shapes, r, names, tokens, args.text_tokens, repeats, not args.no_train_step)
    print()
    print(f"{'set':6s} {'r':>3s} {'optimizer':20s} {'step ms':>9s} {'x AdamW':>8s} {'train ms':>9s} {'x AdamW':>8s} "
          f"{'state MiB':>10s} {'extra floats':>13s}")
    for row in rows:
        print(f"{row['set']:6s} {row['r']:3d} {row['optimizer']:20s} {row['step_ms']:9.2f} {row['step_vs_adamw']:8.2f} "
              f"{row['train_step_ms']:9.1f} {row['train_vs_adamw']:8.2f} {row['state_bytes'] / 2**20:10.2f} "
              f"{row['extra_state_floats']:13.0f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(machine=machine, tokens=args.tokens, text_tokens=args.text_tokens,
                       llama_tokens=args.llama_tokens, repeats=repeats, rows=rows), f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
