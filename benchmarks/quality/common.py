"""Protocol shared by the suites: optimizer configurations, schedules, timing, state bytes,
seed aggregation, tables, JSON and plots."""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from adaprelora import create_optimizer
from adaprelora.factory import DOCUMENTED_LRS

RESULTS_DIR = os.path.join("benchmarks", "results")
IMG_DIR = os.path.join("docs", "img")


@dataclass(frozen=True)
class OptConfig:
    """One optimizer under test: a label, the factory name, extra kwargs and the lr family."""

    label: str
    name: str
    kwargs: dict = field(default_factory=dict)
    family: str = "adam"  # "adam": factor-space lr like AdamW's; "sgd": a plain step size

    def build(self, model, lr: float, **extra):
        return create_optimizer(self.name, model, lr=lr, **{**self.kwargs, **extra})


# Every optimizer name of the library, and both AdaPreLoRA energy sources.
ALL_CONFIGS = [
    OptConfig("adamw", "adamw"),
    OptConfig("loraplus", "loraplus"),
    OptConfig("scaled-adamw", "scaled-adamw"),
    OptConfig("scaled-gd", "scaled-gd", family="sgd"),
    OptConfig("lora-pro", "lora-pro"),
    OptConfig("adaprelora", "adaprelora", {"stats": "exact"}),
    OptConfig("adaprelora-tangent", "adaprelora", {"stats": "tangent"}),
    OptConfig("adaprelora-sgd", "adaprelora-sgd", {"stats": "exact"}, family="sgd"),
    OptConfig("adaprelora-sgd-tangent", "adaprelora-sgd", {"stats": "tangent"}, family="sgd"),
]
# What users of kohya / diffusers / OneTrainer pick instead (the packages' own optimizers).
# family "fixed": the documented lr only (Prodigy estimates its own step size from lr 1.0).
USER_CONFIGS = [
    OptConfig("prodigy", "prodigy", family="fixed"),
    OptConfig("adafactor", "adafactor"),
    OptConfig("schedule-free", "schedule-free"),
    OptConfig("adamw8bit", "adamw8bit"),
]
# Ablations of AdaPreLoRA's open choices (docs/algorithm.md section 6): the paper's raw surrogate
# energies, and momentum before the solve (an EMA of the factor gradients, sgd step) instead of
# AdamW after it.
ABLATION_CONFIGS = [
    OptConfig("adaprelora-raw", "adaprelora", {"stats": "raw"}),
    OptConfig("adaprelora-ema", "adaprelora-sgd", {"stats": "exact", "momentum_before_solve": True}, family="sgd"),
]
# LoRA-RITE (pytorch-optimizer's): LoRA pairs only, so for suites where only the adapter trains or
# other tensors have their own optimizer (MiniLM's head); elsewhere ask for it by name (--configs lora-rite).
PAIR_ONLY_CONFIGS = [OptConfig("lora-rite", "lora-rite")]
CONFIGS_BY_LABEL = {c.label: c for c in ALL_CONFIGS + USER_CONFIGS + ABLATION_CONFIGS + PAIR_ONLY_CONFIGS}
# Optimizers run only at their documented lr (the factory's, which the app also sets).
FIXED_LRS = {name: (lr,) for name, lr in DOCUMENTED_LRS.items()}


def run_dreambooth(config) -> tuple[list, Optional[float], float]:
    """Train one DreamBooth run in process (`adaprelora.training.dreambooth.train`): its per-step
    losses, its last reported steps per second and the wall seconds it took."""
    from adaprelora.training.dreambooth import train

    t0 = time.perf_counter()
    losses, steps_per_sec = [], None
    for event in train(config):
        if event.loss is not None:
            losses.append(float(event.loss))
            steps_per_sec = event.steps_per_sec or steps_per_sec
    return losses, steps_per_sec, time.perf_counter() - t0


def uses_train_eval(opt) -> bool:
    """Schedule-free optimizers keep two weight sequences: train() before stepping, eval() before
    anything reads the weights."""
    return callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None))
DAMPING_CONFIGS = ("adaprelora", "adaprelora-tangent", "adaprelora-sgd")
DAMPING_VALUES = (0.01, 0.1, 1.0)


def with_damping(config: OptConfig, damping: float) -> OptConfig:
    return OptConfig(f"{config.label}@d{damping:g}", config.name, {**config.kwargs, "damping": damping},
                     config.family)


def lr_factor(step: int, total: int, schedule: str = "linear", warmup: int = 0) -> float:
    """Multiplier of the base lr at `step` (0-based): optional linear warmup, then linear or
    cosine decay to 0 at `total`. The same schedule is used for every optimizer."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - frac)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}")


class LrSchedule:
    """Sets every param group's lr to base_lr_of_group * lr_factor(step)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], total: int, schedule: str, warmup: int = 0):
        self.optimizers = list(optimizers)
        self.base = [[g["lr"] for g in o.param_groups] for o in self.optimizers]
        self.total, self.schedule, self.warmup = total, schedule, warmup

    def set(self, step: int) -> None:
        f = lr_factor(step, self.total, self.schedule, self.warmup)
        for opt, bases in zip(self.optimizers, self.base):
            for g, b in zip(opt.param_groups, bases):
                g["lr"] = b * f


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Sum of numel * element_size over all tensors in `opt.state`."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return int(total)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux ru_maxrss is in KiB). Process-wide and
    monotone: on CPU it is an upper bound shared by all runs of one suite, not a per-run figure."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class StepTimer:
    """Median seconds of `opt.step()` and of a whole iteration (forward + backward + step); the
    first `skip` steps (warm-up, state allocation) are left out."""

    def __init__(self, skip: int = 3):
        self.skip = skip
        self.step_s: list[float] = []
        self.iter_s: list[float] = []

    def add(self, step_s: float, iter_s: float) -> None:
        self.step_s.append(step_s)
        self.iter_s.append(iter_s)

    def summary(self) -> dict:
        s = self.step_s[self.skip:] or self.step_s
        i = self.iter_s[self.skip:] or self.iter_s
        return {"opt_step_s_median": float(np.median(s)) if s else float("nan"),
                "iter_s_median": float(np.median(i)) if i else float("nan")}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def finite_or_none(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def mean_spread(values: Sequence[float], geometric: bool = False) -> dict:
    """Mean, std, min and max over seeds; for losses the geometric mean and the std of log10."""
    vals = np.asarray([v for v in values if v is not None], dtype=np.float64)
    n_bad = len(values) - vals.size
    vals_f = vals[np.isfinite(vals)]
    n_bad += vals.size - vals_f.size
    if vals_f.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": len(values), "n_nonfinite": n_bad}
    if geometric:
        logs = np.log10(np.maximum(vals_f, 1e-300))
        mean, std = 10 ** logs.mean(), logs.std()
    else:
        mean, std = vals_f.mean(), vals_f.std()
    return {"mean": float(mean), "std": float(std), "min": float(vals_f.min()), "max": float(vals_f.max()),
            "n": len(values), "n_nonfinite": n_bad, "geometric": geometric}


def machine_info() -> dict:
    return {"machine": "2-core x86_64 CPU, no GPU", "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def write_json(payload: dict, suite: str, profile: str, out_dir: Optional[str] = None) -> str:
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"quality_{suite}.json" if profile == "quick" else f"quality_{suite}_{profile}.json")
    with open(path, "w") as fh:
        json.dump(_json_safe(payload), fh, indent=1, sort_keys=False)
        fh.write("\n")
    return path


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        if not math.isfinite(c):
            return "nan"
        if c != 0 and (abs(c) < 1e-3 or abs(c) >= 1e5):
            return f"{c:.2e}"
        return f"{c:.4g}"
    return str(c)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def plot_curves(path: str, series: dict, *, title: str, xlabel: str, ylabel: str, logy: bool = False,
                bands: Optional[dict] = None, logx: bool = False) -> Optional[str]:
    """series: label -> (x, y); bands: label -> (x, lo, hi). Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # pragma: no cover
        return None
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, (x, y) in series.items():
        style = "-" if "adaprelora" in label else "--"
        line, = ax.plot(x, y, style, label=label, linewidth=2.0 if label.startswith("adaprelora") else 1.3)
        if bands and label in bands:
            bx, lo, hi = bands[label]
            ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.15)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log2_grid(centre: float, points: int) -> list:
    """`points` lrs a factor 2 apart, `centre` at index (points - 1) // 2."""
    return [centre * 2.0 ** (k - (points - 1) // 2) for k in range(points)]


def sweep_lr(run_point: Callable[[float], dict], grid: Sequence[float], key: Callable[[dict], tuple],
             max_extend: int, fixed: bool = False, log=None) -> dict:
    """The lr tuning of the suites: `run_point(lr)` (a training run on the tuning seed, returning
    its record) at every lr of `grid`, the best picked by `key(record)` (largest wins; equal keys:
    the lower lr). While the best sits at an end of the grid, one more point is run beyond that
    end (half the lowest lr or twice the highest: a log2 grid stays one), up to `max_extend`
    times, so the best lr is interior where the budget allows. `fixed`: a documented lr only
    (Prodigy's 1.0), never extended, and `interior` is None (neither interior nor not).
    Returns {"sweep": {lr: record}, "lrs": sorted lrs, "best_lr", "interior", "extended"}."""
    sweep = {}
    for lr in grid:
        sweep[lr] = run_point(lr)

    extended = 0
    while not fixed and extended < max_extend:
        lr = next_grid_point({x: key(r) for x, r in sweep.items()})
        if lr is None:
            break
        if log:
            log(f"  best lr {best_grid_point({x: key(r) for x, r in sweep.items()}):g} at the grid's end: "
                f"extending to {lr:g}")
        sweep[lr] = run_point(lr)
        extended += 1
    lrs = sorted(sweep)
    best_lr = best_grid_point({x: key(r) for x, r in sweep.items()})
    return {"sweep": sweep, "lrs": lrs, "best_lr": best_lr,
            "interior": None if fixed else 0 < lrs.index(best_lr) < len(lrs) - 1, "extended": extended}


def best_grid_point(keys: dict) -> float:
    """The lr of {lr: key} with the largest key (equal keys: the lower lr)."""
    lrs = sorted(keys)
    return max(lrs, key=lambda lr: keys[lr])  # max keeps the first (lowest) of equal keys


def next_grid_point(keys: dict) -> Optional[float]:
    """The lr a 2x log grid {lr: key} is extended by while its best lr sits at an end (half the
    lowest or twice the highest), or None when the best is interior."""
    lrs = sorted(keys)
    best = best_grid_point(keys)
    if best == lrs[0]:
        return lrs[0] / 2
    if best == lrs[-1]:
        return lrs[-1] * 2
    return None


def result_path(suite: str, profile: str, out_dir: Optional[str] = None, tag: Optional[str] = None) -> str:
    """Where `write_json` puts a suite's results (the `__main__` naming, `tag` a suffix)."""
    name = suite + (f"_{tag}" if tag else "")
    return os.path.join(out_dir or RESULTS_DIR, f"quality_{name}.json" if profile == "quick" else
                        f"quality_{name}_{profile}.json")


def load_previous(path: str, result: dict, keys: Sequence[str], log=print) -> Optional[dict]:
    """The results already at `path` when they were made with the same settings (the `keys` of
    the result and its `profile_settings`, the config list aside), else None: a suite run in
    parts merges its configs into them, one of other settings is replaced."""
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        old = json.load(fh)
    new = json.loads(json.dumps(_json_safe(result)))

    def settings(res):
        return {k: v for k, v in res.get("profile_settings", {}).items() if k != "configs"}

    if not (all(old.get(k) == new.get(k) for k in keys) and settings(old) == settings(new)):
        log(f"  {path} holds results of other settings: they are replaced, not merged")
        return None
    return old


def timed_step(opt, extra_opts=()) -> float:
    t0 = time.perf_counter()
    opt.step()
    for o in extra_opts:
        o.step()
    return time.perf_counter() - t0
