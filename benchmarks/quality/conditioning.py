"""Suite 1, conditioning: LoRA fitted to a low-rank target adapter on a frozen linear or two-layer
model whose input features span several orders of magnitude.

Problem (seeded; a seed fixes the instance, the LoRA init and the batches):
  x = z * scales,  z ~ N(0, I_n),  scales log-spaced over `scale_decades` decades (largest 1)
  linear: y = (W0 + dW*) x                       LoRA on the one layer
  mlp:    y = (W2 + dW2*) gelu((W1 + dW1*) x)     LoRA on both layers, hidden width `hidden`
  dW* = U diag(sigma) V^T, rank `target_rank`, sigma log-spaced from 1 to 1/`kappa`
  (for the mlp each dW is scaled to the norm of its frozen layer times `target_scale`).
Loss: mean squared error; the reported figure is the held-out loss relative to the loss at
initialisation (B = 0, so the adapter starts at the frozen model), min over nothing: the last
evaluation. Steps to threshold: first evaluation step at which the relative loss <= threshold.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import common as C

PROFILES = {
    "smoke": dict(steps=6, eval_every=3, seeds=(0,), problems=("linear",), lr_points=1,
                  configs=None, damping=True),
    "quick": dict(steps=200, eval_every=10, seeds=(0, 1, 2), problems=("linear", "mlp"), lr_points=None,
                  configs=None, damping=True),
    "full": dict(steps=1000, eval_every=10, seeds=(0, 1, 2, 3, 4), problems=("linear", "mlp"), lr_points=None,
                 configs=None, damping=True),
}
# Learning-rate grids (the best by geometric-mean final loss over seeds is reported).
# (A pilot at 200 steps, seed 0, placed the optima inside these ranges: AdamW-type optimizers
# at 1e-2..1e-1, Scaled GD wants steps >= 1, AdaPreLoRA-SGD 1e-2..1e-1.)
LR_GRIDS = {
    "adam": (1e-2, 3e-2, 1e-1, 3e-1),
    "scaled-gd": (0.3, 1.0, 3.0, 10.0),
    "adaprelora-sgd": (3e-3, 1e-2, 3e-2, 1e-1),
}
PROBLEM = dict(n=64, m=32, hidden=64, target_rank=4, lora_rank=4, kappa=100.0, scale_decades=3.0,
               n_train=1024, n_eval=512, batch=64, target_scale=0.5, schedule="linear", warmup=0,
               threshold=1e-3)


def lr_grid(config: C.OptConfig) -> tuple:
    if config.name == "scaled-gd":
        return LR_GRIDS["scaled-gd"]
    if config.name == "adaprelora-sgd":
        return LR_GRIDS["adaprelora-sgd"]
    return LR_GRIDS["adam"]


class Linear1(nn.Module):
    def __init__(self, n, m):
        super().__init__()
        self.fc = nn.Linear(n, m, bias=False)

    def forward(self, x):
        return self.fc(x)


class MLP2(nn.Module):
    def __init__(self, n, h, m):
        super().__init__()
        self.fc1 = nn.Linear(n, h, bias=False)
        self.fc2 = nn.Linear(h, m, bias=False)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


def _low_rank(m, n, rank, kappa, gen):
    U, _ = torch.linalg.qr(torch.randn(m, rank, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64))
    sigma = torch.logspace(0, -math.log10(kappa), rank, dtype=torch.float64)
    return (U * sigma) @ V.T


def make_problem(kind: str, seed: int, p: dict):
    """(frozen base model, teacher model, train x, train y, eval x, eval y)"""
    gen = torch.Generator().manual_seed(10_000 + seed)
    n, m, h = p["n"], p["m"], p["hidden"]
    scales = torch.logspace(-p["scale_decades"], 0, n, dtype=torch.float64)
    scales = scales[torch.randperm(n, generator=gen)]

    def inputs(count):
        return (torch.randn(count, n, generator=gen, dtype=torch.float64) * scales).float()

    if kind == "linear":
        base = Linear1(n, m)
        with torch.no_grad():
            base.fc.weight.copy_(torch.randn(m, n, generator=gen) / math.sqrt(n))
        teacher = Linear1(n, m)
        with torch.no_grad():
            dW = _low_rank(m, n, p["target_rank"], p["kappa"], gen)
            teacher.fc.weight.copy_(base.fc.weight.double() + dW)
    elif kind == "mlp":
        base = MLP2(n, h, m)
        with torch.no_grad():
            base.fc1.weight.copy_(torch.randn(h, n, generator=gen) / math.sqrt(n) * 4.0)
            base.fc2.weight.copy_(torch.randn(m, h, generator=gen) / math.sqrt(h))
        teacher = MLP2(n, h, m)
        with torch.no_grad():
            for name in ("fc1", "fc2"):
                W = getattr(base, name).weight.double()
                dW = _low_rank(W.shape[0], W.shape[1], p["target_rank"], p["kappa"], gen)
                dW = dW / dW.norm() * W.norm() * p["target_scale"]
                getattr(teacher, name).weight.copy_(W + dW)
    else:
        raise ValueError(kind)
    x_tr, x_ev = inputs(p["n_train"]), inputs(p["n_eval"])
    with torch.no_grad():
        y_tr, y_ev = teacher(x_tr), teacher(x_ev)
    return base, x_tr, y_tr, x_ev, y_ev


def lora_model(base: nn.Module, kind: str, rank: int, seed: int, alpha: Optional[int] = None):
    """The PEFT LoRA model of a problem; `alpha` defaults to the rank (scale 1)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    targets = ["fc"] if kind == "linear" else ["fc1", "fc2"]
    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, lora_dropout=0.0, bias="none")
    return get_peft_model(base, cfg)


def run_one(kind: str, config: C.OptConfig, lr: float, seed: int, steps: int, eval_every: int, p: dict,
            accum: int = 1) -> dict:
    """One training run; `accum` > 1 splits each batch into that many micro-batches whose
    backward passes accumulate (same gradient, AdaPreLoRA's exact energies summed per micro-batch)."""
    base, x_tr, y_tr, x_ev, y_ev = make_problem(kind, seed, p)
    model = lora_model(base, kind, p["lora_rank"], seed, p.get("lora_alpha"))
    opt = config.build(model, lr)
    sched = C.LrSchedule([opt], steps, p["schedule"], p["warmup"])
    gen = torch.Generator().manual_seed(20_000 + seed)
    with torch.no_grad():
        loss0 = float(((model(x_ev) - y_ev) ** 2).mean())
    curve_steps, curve = [0], [1.0]
    train_losses = []
    timer = C.StepTimer()
    reached: Optional[int] = None
    diverged = False
    for step in range(steps):
        t0 = time.perf_counter()
        sched.set(step)
        idx = torch.randint(0, x_tr.shape[0], (p["batch"],), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for chunk in idx.chunk(accum):
            part = ((model(x_tr[chunk]) - y_tr[chunk]) ** 2).mean() * (chunk.numel() / idx.numel())
            part.backward()
            loss = loss + part.detach()
        step_s = C.timed_step(opt)
        timer.add(step_s, time.perf_counter() - t0)
        train_losses.append(float(loss) / loss0)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            with torch.no_grad():
                rel = float(((model(x_ev) - y_ev) ** 2).mean()) / loss0
            curve_steps.append(step + 1)
            curve.append(rel if math.isfinite(rel) else float("nan"))
            if reached is None and math.isfinite(rel) and rel <= p["threshold"]:
                reached = step + 1
            if not math.isfinite(rel) or rel > 1e6:
                diverged = True
                break
    final = curve[-1] if not diverged else float("nan")
    return {"kind": kind, "config": config.label, "lr": lr, "seed": seed, "final_rel_loss": final,
            "steps_to_threshold": reached, "diverged": diverged, "curve_steps": curve_steps, "curve": curve,
            "train_rel_loss": train_losses[:: max(1, len(train_losses) // 100)],
            "state_bytes": C.state_bytes(opt), **timer.summary(), "peak_rss_bytes": C.peak_rss_bytes()}


def _around(grid, best, points):
    """`points` grid values centred on `best` (the damping sweep re-tunes lr near the 0.1 optimum)."""
    i = list(grid).index(best)
    lo = max(0, min(i - points // 2, len(grid) - points))
    return tuple(grid[lo:lo + points])


def _score(runs) -> float:
    """Geometric mean of the final relative loss over seeds; a diverged seed scores +inf."""
    vals = [r["final_rel_loss"] for r in runs]
    if any(v is None or not math.isfinite(v) for v in vals):
        return float("inf")
    return float(np.mean(np.log10(np.maximum(vals, 1e-300))))


def sweep(kind, config, grid, seeds, steps, eval_every, p, log) -> dict:
    by_lr = {}
    for lr in grid:
        runs = [run_one(kind, config, lr, s, steps, eval_every, p) for s in seeds]
        by_lr[lr] = runs
        log(f"  {kind:6s} {config.label:26s} lr={lr:<7g} final rel loss "
            + ", ".join(C._fmt(r["final_rel_loss"]) for r in runs))
    best_lr = min(grid, key=lambda lr: _score(by_lr[lr]))
    best = by_lr[best_lr]
    return {"config": config.label, "kwargs": config.kwargs, "lr_grid": list(grid), "best_lr": best_lr,
            "sweep": {str(lr): {"final_rel_loss": C.mean_spread([r["final_rel_loss"] for r in runs], geometric=True)}
                      for lr, runs in by_lr.items()},
            "summary": summarize(best), "runs": best}


def summarize(runs) -> dict:
    reached = [r["steps_to_threshold"] for r in runs]
    return {"final_rel_loss": C.mean_spread([r["final_rel_loss"] for r in runs], geometric=True),
            "steps_to_threshold": C.mean_spread([x for x in reached if x is not None]),
            "n_reached_threshold": sum(x is not None for x in reached),
            "opt_step_s_median": float(np.median([r["opt_step_s_median"] for r in runs])),
            "iter_s_median": float(np.median([r["iter_s_median"] for r in runs])),
            "state_bytes": runs[0]["state_bytes"], "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs)}


def run_suite(profile: str = "quick", log=print, configs: Optional[list] = None, out_dir=None,
              img_dir=None) -> dict:
    prof = PROFILES[profile]
    p = dict(PROBLEM)
    steps, eval_every, seeds = prof["steps"], prof["eval_every"], prof["seeds"]
    configs = configs or [c.label for c in C.ALL_CONFIGS]
    t_start = time.perf_counter()
    result = {"suite": "conditioning", "profile": profile, "machine": C.machine_info(), "problem": p,
              "steps": steps, "seeds": list(seeds), "lr_selection": "best geometric-mean final relative loss over all seeds",
              "problems": {}}
    for kind in prof["problems"]:
        entry = {"optimizers": {}, "damping": {}}
        for label in configs:
            cfg = C.CONFIGS_BY_LABEL[label]
            grid = lr_grid(cfg)
            if prof["lr_points"]:
                grid = grid[len(grid) // 2: len(grid) // 2 + prof["lr_points"]]
            entry["optimizers"][label] = sweep(kind, cfg, grid, seeds, steps, eval_every, p, log)
        if prof["damping"]:
            for label in C.DAMPING_CONFIGS:
                if label not in configs:
                    continue
                cfg = C.CONFIGS_BY_LABEL[label]
                entry["damping"][label] = {"0.1": {"best_lr": entry["optimizers"][label]["best_lr"],
                                                   "summary": entry["optimizers"][label]["summary"]}}
                for d in C.DAMPING_VALUES:
                    if d == 0.1:
                        continue
                    grid = _around(lr_grid(cfg), entry["optimizers"][label]["best_lr"], prof["lr_points"] or 3)
                    sw = sweep(kind, C.with_damping(cfg, d), grid, seeds, steps, eval_every, p, log)
                    entry["damping"][label][f"{d:g}"] = {"best_lr": sw["best_lr"], "summary": sw["summary"],
                                                         "curve_steps": sw["runs"][0]["curve_steps"],
                                                         "curves": [r["curve"] for r in sw["runs"]]}
        result["problems"][kind] = entry
    result["wall_s"] = time.perf_counter() - t_start
    report(result, log, img_dir)
    return result


def table_rows(entry: dict) -> list:
    ref = entry["optimizers"].get("adamw", {}).get("summary", {})
    ref_t = ref.get("opt_step_s_median") or float("nan")
    rows = []
    for label, o in entry["optimizers"].items():
        s = o["summary"]
        fl, st = s["final_rel_loss"], s["steps_to_threshold"]
        rows.append([label, o["best_lr"], fl["mean"], fl["min"], fl["max"],
                     f"{s['n_reached_threshold']}/{fl['n']}", st["mean"],
                     s["opt_step_s_median"] * 1e3, s["opt_step_s_median"] / ref_t, s["iter_s_median"] * 1e3,
                     s["state_bytes"]])
    return rows


TABLE_HEADERS = ["optimizer", "best lr", "final rel loss (geo-mean)", "min", "max", "reached 1e-3",
                 "steps to 1e-3 (mean of those)", "opt step ms", "step / adamw", "iter ms", "state bytes"]


def damping_rows(entry: dict) -> list:
    rows = []
    for label, by_d in entry["damping"].items():
        for d in ("0.01", "0.1", "1"):
            if d in by_d:
                s = by_d[d]["summary"]
                fl = s["final_rel_loss"]
                rows.append([label, d, by_d[d]["best_lr"], fl["mean"], fl["min"], fl["max"],
                             f"{s['n_reached_threshold']}/{fl['n']}", s["steps_to_threshold"]["mean"]])
    return rows


DAMPING_HEADERS = ["optimizer", "damping", "best lr", "final rel loss (geo-mean)", "min", "max", "reached 1e-3",
                   "steps to 1e-3"]


def report(result: dict, log=print, img_dir=None) -> None:
    import os

    img_dir = img_dir or C.IMG_DIR
    for kind, entry in result["problems"].items():
        log(f"\n== conditioning / {kind} ({result['steps']} steps, seeds {result['seeds']}) ==")
        log(C.format_table(TABLE_HEADERS, table_rows(entry)))
        if entry["damping"]:
            log(f"\n-- damping sensitivity ({kind}) --")
            log(C.format_table(DAMPING_HEADERS, damping_rows(entry)))
        series, bands = {}, {}
        for label, o in entry["optimizers"].items():
            runs = o["runs"]
            x = runs[0]["curve_steps"]
            n = min(len(r["curve"]) for r in runs)
            ys = np.array([r["curve"][:n] for r in runs], dtype=np.float64)
            with np.errstate(all="ignore"):
                gm = 10 ** np.nanmean(np.log10(np.maximum(ys, 1e-300)), axis=0)
            series[f"{label} (lr {o['best_lr']:g})"] = (x[:n], gm)
            bands[f"{label} (lr {o['best_lr']:g})"] = (x[:n], np.nanmin(ys, 0), np.nanmax(ys, 0))
        if result["profile"] != "smoke":
            path = C.plot_curves(os.path.join(img_dir, f"quality_conditioning_{kind}.png"), series, bands=bands,
                                 title=f"Conditioning ({kind}): held-out loss / initial, best lr each, "
                                       f"{len(result['seeds'])} seeds",
                                 xlabel="step", ylabel="relative loss (geo-mean, band = min..max)", logy=True)
            result.setdefault("plots", []).append(path)
