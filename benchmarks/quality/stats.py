"""Comparison statistics for the quality suites: paired differences against a baseline with
bootstrap intervals, and how forgiving an optimizer is about its learning rate.

Paired: each unit (a subject or task, a seed, the same data order) is run once with the baseline
and once with the candidate, and only the per-unit differences are resampled. Differences
between units (an easy subject, a lucky seed) cancel, so a small real gap can show through a large
spread of raw scores. The interval is the percentile bootstrap of the mean difference, seeded,
so a table is reproducible.

Learning-rate band: on a log2 grid (each lr twice the last), the width in octaves of the run of
grid points around the best lr whose score stays within 90% of the best. A wide band means a
user's untuned lr is likely to be close enough.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

N_BOOT = 10_000
BOOT_SEED = 0


def bootstrap_mean_interval(values: Sequence[float], *, level: float = 0.95, n_boot: int = N_BOOT,
                            seed: int = BOOT_SEED) -> dict:
    """Mean of `values` and its percentile-bootstrap interval: `n_boot` resamples of the values
    with replacement (row b is `rng.integers(0, n, n)` of `numpy.random.default_rng(seed)`), the
    interval is the (1-level)/2 and (1+level)/2 quantiles (linear interpolation) of the resample
    means. One value gives a zero-width interval at that value."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap needs a non-empty 1-D list of values")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap values must be finite")
    n = x.size
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return {"mean": float(x.mean()), "lo": float(lo), "hi": float(hi), "n": int(n), "level": level,
            "n_boot": n_boot, "seed": seed}


def paired_differences(candidate: Mapping, baseline: Mapping, *, relative: bool = False) -> dict:
    """{unit: candidate - baseline} over the units both have a finite score for; `relative` gives
    (candidate - baseline) / |baseline| (a 2% loss gap reads 0.02 whatever the loss's scale)."""
    out = {}
    for unit, b in baseline.items():
        c = candidate.get(unit)
        if c is None or b is None or not (math.isfinite(c) and math.isfinite(b)):
            continue
        if relative:
            if b == 0:
                continue
            out[unit] = (c - b) / abs(b)
        else:
            out[unit] = c - b
    return out


def paired_interval(candidate: Mapping, baseline: Mapping, *, relative: bool = False, level: float = 0.95,
                    n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> Optional[dict]:
    """Mean paired difference (candidate - baseline) with its bootstrap interval, or None when
    no unit has both scores. `excludes_zero` says whether the interval lies wholly on one side of
    zero (never with a single unit). Few units make a coarse interval: 3 seeds give only 10
    distinct resample means."""
    diffs = paired_differences(candidate, baseline, relative=relative)
    if not diffs:
        return None
    units = sorted(diffs, key=str)  # a fixed order, so the same resamples pick the same units
    out = bootstrap_mean_interval([diffs[u] for u in units], level=level, n_boot=n_boot, seed=seed)
    out["relative"] = relative
    # one unit gives a zero-width "interval": it says nothing about noise, so it excludes nothing
    out["excludes_zero"] = bool(out["n"] >= 2 and (out["lo"] > 0 or out["hi"] < 0))
    out["units"] = [list(u) if isinstance(u, tuple) else u for u in units]
    return out


def paired_vs_baseline(runs_by_label: Mapping[str, Sequence[dict]], baseline: str, metrics: Mapping[str, bool],
                       value: Callable[[dict, str], Optional[float]] = lambda run, key: run.get(key),
                       unit: Callable[[dict], object] = lambda run: run["seed"]) -> dict:
    """{label: {metric: paired_interval}} for every label but `baseline`: runs are paired by
    `unit(run)` (the seed, by default), `metrics` maps each metric to whether its difference is
    relative. Empty when the baseline did not run."""
    if baseline not in runs_by_label:
        return {}
    ref_runs = runs_by_label[baseline]
    out = {}
    for label, runs in runs_by_label.items():
        if label == baseline:
            continue
        out[label] = {key: paired_interval({unit(r): value(r, key) for r in runs},
                                           {unit(r): value(r, key) for r in ref_runs}, relative=relative)
                      for key, relative in metrics.items()}
    return out


def lr_band(lrs: Sequence[float], scores: Sequence[Optional[float]], *, higher_is_better: bool = True,
            within: float = 0.9) -> Optional[dict]:
    """Best lr of a sweep, whether it is interior (neither end of the grid), and the band of lrs
    around it whose score is within `within` of the best: score >= within * best when higher is
    better, best / score >= within (score <= best / within) for a loss. The band is the run of
    consecutive grid points through the best that qualify (an isolated lucky point elsewhere does
    not widen it); its width is log2(largest / smallest lr in it), in octaves. A diverged run
    (score None or not finite) never qualifies. Scores must be positive. None if every run failed."""
    pairs = sorted(zip(lrs, scores), key=lambda p: p[0])
    ok = [s is not None and math.isfinite(s) for _, s in pairs]
    if not any(ok):
        return None
    if any(o and s <= 0 for o, (_, s) in zip(ok, pairs)):
        raise ValueError("lr_band needs positive scores (a ratio to the best is taken)")
    valid = [i for i, o in enumerate(ok) if o]
    pick = max if higher_is_better else min
    best = pick(valid, key=lambda i: pairs[i][1])
    best_score = pairs[best][1]

    def qualifies(i):
        if not ok[i]:
            return False
        s = pairs[i][1]
        return s >= within * best_score if higher_is_better else best_score / s >= within

    lo = best
    while lo - 1 >= 0 and qualifies(lo - 1):
        lo -= 1
    hi = best
    while hi + 1 < len(pairs) and qualifies(hi + 1):
        hi += 1
    return {"best_lr": pairs[best][0], "best_score": best_score, "interior": 0 < best < len(pairs) - 1,
            "band_lo": pairs[lo][0], "band_hi": pairs[hi][0],
            "band_width_log2": float(math.log2(pairs[hi][0] / pairs[lo][0])), "within": within,
            "higher_is_better": higher_is_better}


def interval_text(iv: Optional[dict], digits: int = 3) -> str:
    """`+0.012 [-0.004, +0.030]` (a relative interval in percent), or `-` without one."""
    if iv is None:
        return "-"
    if iv.get("relative"):
        return f"{100 * iv['mean']:+.1f}% [{100 * iv['lo']:+.1f}, {100 * iv['hi']:+.1f}]"
    return f"{iv['mean']:+.{digits}f} [{iv['lo']:+.{digits}f}, {iv['hi']:+.{digits}f}]"


__all__ = ["bootstrap_mean_interval", "interval_text", "lr_band", "paired_differences", "paired_interval",
           "paired_vs_baseline"]
