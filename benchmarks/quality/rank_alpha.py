"""Rank and alpha: how far does each optimizer's best lr move when the LoRA rank or alpha changes?

AdaPreLoRA's step is invariant to the GL(r) reparametrisation of a pair (A, B) -> (R A, B R^-1)
(`docs/algorithm.md`), so its best lr should move less across ranks and alphas than AdamW's, whose
step on W = (alpha / r) B A grows with the scale alpha / r. This measures it on the conditioning
problems of suite 1 (`conditioning.py`: a LoRA fitted to an ill-conditioned low-rank target, seconds
per run): for each optimizer and each (rank, alpha) in {4, 16, 64} x {alpha = rank, alpha = 1}, the
lr is swept on a log2 grid until its best is interior (`common.sweep_lr`; score: the geometric mean
over seeds of the final held-out loss relative to the start, a diverged seed losing), starting at
the optimizer's best lr for rank 16, alpha 16 (the reference, swept first). Reported per setting:
the best lr, its distance from the reference's in octaves, the loss there, and the loss at the
reference's lr, i.e. what a user who changes rank or alpha and keeps the lr gets.

    python -m benchmarks.quality rank-alpha [--quick|--smoke]   # writes quality_rank_alpha.json
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

from . import common as C
from . import conditioning as S

PROFILES = {
    "smoke": dict(steps=4, seeds=(0,), problems=("linear",), ranks=(4, 16), alphas=("rank", 1), points=2,
                  max_extend=1, configs=("adamw", "adaprelora")),
    "quick": dict(steps=200, seeds=(0, 1, 2), problems=("linear", "mlp"), ranks=(4, 16, 64), alphas=("rank", 1),
                  points=3, max_extend=12,
                  configs=("adamw", "scaled-adamw", "adaprelora", "adaprelora-sgd", "adaprelora-ema")),
}
PROFILES["full"] = dict(PROFILES["quick"], steps=1000, seeds=(0, 1, 2, 3, 4))
REFERENCE = (16, "rank")  # the setting whose best lr every other one is compared with


def alpha_of(rank: int, alpha) -> int:
    return rank if alpha == "rank" else int(alpha)


def setting_name(rank: int, alpha) -> str:
    return f"r{rank} alpha {'=r' if alpha == 'rank' else alpha}"


def _start_lr(kind: str, label: str, config: C.OptConfig) -> float:
    """Where the reference sweep starts: the suite-1 best lr (committed JSON), else its grid's middle."""
    path = os.path.join(C.RESULTS_DIR, "quality_conditioning.json")
    if os.path.exists(path):
        with open(path) as fh:
            entry = json.load(fh)["problems"].get(kind, {}).get("optimizers", {}).get(label)
        if entry:
            return float(entry["best_lr"])
    grid = S.lr_grid(config)
    return float(grid[len(grid) // 2])


def _score(record: dict) -> tuple:
    """Larger is better for `sweep_lr`: minus suite 1's score (mean log10 final loss; diverged: +inf)."""
    return (-S._score([{"final_rel_loss": v} for v in record["final_rel_loss"]]),)


def run_setting(kind: str, config: C.OptConfig, rank: int, alpha, start_lr: float, prof: dict, log) -> dict:
    """The lr sweep of one optimizer at one (rank, alpha): every seed at every lr."""
    p = dict(S.PROBLEM, lora_rank=rank, lora_alpha=alpha_of(rank, alpha))

    def run_point(lr: float) -> dict:
        runs = [S.run_one(kind, config, lr, s, prof["steps"], prof["steps"], p) for s in prof["seeds"]]
        finals = [r["final_rel_loss"] for r in runs]
        log(f"  {kind:6s} {config.label:16s} {setting_name(rank, alpha):14s} lr={lr:<9.4g} final rel loss "
            + ", ".join(C._fmt(v) for v in finals))
        return {"final_rel_loss": finals, "geo_mean": C.mean_spread(finals, geometric=True)["mean"]}

    sw = C.sweep_lr(run_point, C.log2_grid(start_lr, prof["points"]), _score, prof["max_extend"])
    best = sw["sweep"][sw["best_lr"]]
    return {"rank": rank, "alpha": alpha_of(rank, alpha), "best_lr": sw["best_lr"], "interior": sw["interior"],
            "best_loss": best["geo_mean"], "sweep": {str(lr): sw["sweep"][lr] for lr in sw["lrs"]}}


def run_suite(profile: str = "quick", log=print, configs: Optional[list] = None, img_dir=None) -> dict:
    prof = PROFILES[profile]
    t0 = time.perf_counter()
    out = {"suite": "rank_alpha", "profile": profile, "machine": C.machine_info(), "problem": dict(S.PROBLEM),
           "profile_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in prof.items()},
           "reference": setting_name(*REFERENCE), "problems": {}}
    for kind in prof["problems"]:
        entry = {}
        for label in configs or prof["configs"]:
            cfg = C.CONFIGS_BY_LABEL[label]
            ref = run_setting(kind, cfg, REFERENCE[0], REFERENCE[1], _start_lr(kind, label, cfg), prof, log)
            settings = {setting_name(*REFERENCE): ref}
            for rank in prof["ranks"]:
                for alpha in prof["alphas"]:
                    if (rank, alpha) != REFERENCE and not (alpha != "rank" and alpha_of(rank, alpha) == rank):
                        settings[setting_name(rank, alpha)] = run_setting(kind, cfg, rank, alpha, ref["best_lr"],
                                                                          prof, log)
            entry[label] = {"settings": settings, **summarize(settings, ref)}
        out["problems"][kind] = entry
    out["wall_s"] = time.perf_counter() - t0
    report(out, log)
    return out


def summarize(settings: dict, ref: dict) -> dict:
    """Per setting: octaves from the reference's best lr, and the loss at the reference's lr (None
    where the sweep did not reach that lr). Overall: the span of the best lrs in octaves."""
    ref_lr = ref["best_lr"]
    for s in settings.values():
        s["octaves_from_reference"] = math.log2(s["best_lr"] / ref_lr)
        at_ref = next((v for k, v in s["sweep"].items() if math.isclose(float(k), ref_lr, rel_tol=1e-9)), None)
        s["loss_at_reference_lr"] = at_ref["geo_mean"] if at_ref else None
    octaves = [s["octaves_from_reference"] for s in settings.values()]
    return {"best_lr_span_octaves": max(octaves) - min(octaves),
            "all_interior": all(s["interior"] for s in settings.values())}


HEADERS = ["problem", "optimizer", "setting", "best lr", "interior", "octaves from r16 alpha=r", "loss at best lr",
           "loss at the r16 best lr", "cost of keeping the lr"]
SPAN_HEADERS = ["problem", "optimizer", "span of the best lrs (octaves)", "worst cost of keeping the lr"]


def _cost(s: dict):
    """How many times higher the loss is at the reference lr than at the setting's own best."""
    at_ref, best = s["loss_at_reference_lr"], s["best_loss"]
    if at_ref is None or best is None:
        return None
    return at_ref / best


def table_rows(out: dict) -> list:
    rows = []
    for kind, entry in out["problems"].items():
        for label, e in entry.items():
            for name, s in e["settings"].items():
                rows.append([kind, label, name, s["best_lr"], "yes" if s["interior"] else "no",
                             f"{s['octaves_from_reference']:+.0f}", s["best_loss"], s["loss_at_reference_lr"],
                             _cost(s)])
    return rows


def span_rows(out: dict) -> list:
    rows = []
    for kind, entry in out["problems"].items():
        for label, e in entry.items():
            costs = [_cost(s) for s in e["settings"].values()]
            known = [c for c in costs if c is not None]
            rows.append([kind, label, e["best_lr_span_octaves"], max(known) if known else None])
    return rows


def report(out: dict, log=print) -> None:
    log("\n== rank and alpha: best lr per setting (conditioning problems; loss = final held-out / initial) ==")
    log(C.format_table(HEADERS, table_rows(out)))
    log("\n== how far the best lr moves over the settings ==")
    log(C.format_table(SPAN_HEADERS, span_rows(out)))
