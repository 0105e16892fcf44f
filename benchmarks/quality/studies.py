"""Follow-up studies on the conditioning problems, for the spec's open questions (section 6):

* `sgd_momentum`: does heavy-ball momentum close the gap of AdaPreLoRA-SGD to the AdamW variant
  on the two-layer problem (open question 2)? lr grid as suite 1, momentum 0 / 0.9.
* `accumulation`: gradient accumulation with exact energies summed over micro-batches (spec 3.1,
  "documented approximation") against the same batch in one backward (open question 3), at each
  optimizer's suite-1 best lr.

    python -m benchmarks.quality studies [--quick|--smoke]
"""
from __future__ import annotations

import json
import os
import time

from . import common as C
from . import conditioning as S

PROFILES = {
    "smoke": dict(steps=4, seeds=(0,), problems=("linear",), accum=(1, 2), lrs=1),
    "quick": dict(steps=200, seeds=(0, 1, 2), problems=("linear", "mlp"), accum=(1, 4), lrs=None),
    "full": dict(steps=1000, seeds=(0, 1, 2, 3, 4), problems=("linear", "mlp"), accum=(1, 4, 16), lrs=None),
}


def _best_lrs(profile: str) -> dict:
    """Suite-1 best lr per (problem, optimizer) from the committed JSON, when there is one."""
    path = os.path.join(C.RESULTS_DIR, "quality_conditioning.json" if profile != "smoke" else "-")
    if not os.path.exists(path):
        return {}
    res = json.load(open(path))
    return {(k, label): o["best_lr"] for k, e in res["problems"].items() for label, o in e["optimizers"].items()}


def run_suite(profile: str = "quick", log=print, configs=None, img_dir=None) -> dict:
    prof = PROFILES[profile]
    p = dict(S.PROBLEM)
    best = _best_lrs(profile)
    t0 = time.perf_counter()
    out = {"suite": "studies", "profile": profile, "machine": C.machine_info(), "problem": p, "steps": prof["steps"],
           "seeds": list(prof["seeds"]), "sgd_momentum": {}, "accumulation": {}}
    for kind in prof["problems"]:
        # 1. momentum for the sgd variant: full lr grid of suite 1, momentum 0 and 0.9
        entry = {}
        base = C.CONFIGS_BY_LABEL["adaprelora-sgd"]
        for mom in (0.0, 0.9):
            cfg = C.OptConfig(f"adaprelora-sgd@m{mom:g}", base.name, {**base.kwargs, "momentum": mom}, "sgd")
            grid = S.lr_grid(base)
            if mom:  # heavy-ball momentum 0.9 multiplies the steady-state step by 10: move the grid down 10x
                grid = tuple(lr / 10 for lr in grid)
            if prof["lrs"]:
                grid = grid[:prof["lrs"]]
            sw = S.sweep(kind, cfg, grid, prof["seeds"], prof["steps"], 10, p, log)
            entry[f"{mom:g}"] = {"best_lr": sw["best_lr"], "summary": sw["summary"], "sweep": sw["sweep"]}
        out["sgd_momentum"][kind] = entry
        # 2. gradient accumulation at the suite-1 best lr
        acc_entry = {}
        for label in ("adaprelora", "adaprelora-tangent", "adamw"):
            cfg = C.CONFIGS_BY_LABEL[label]
            lr = best.get((kind, label), S.lr_grid(cfg)[1])
            acc_entry[label] = {"lr": lr}
            for a in prof["accum"]:
                runs = [S.run_one(kind, cfg, lr, s, prof["steps"], 10, p, accum=a) for s in prof["seeds"]]
                acc_entry[label][str(a)] = S.summarize(runs)
                log(f"  {kind:6s} {label:20s} accum {a:2d} lr={lr:g}: final rel loss "
                    + ", ".join(C._fmt(r["final_rel_loss"]) for r in runs))
        out["accumulation"][kind] = acc_entry
    out["wall_s"] = time.perf_counter() - t0
    report(out, log)
    return out


MOM_HEADERS = ["problem", "momentum", "best lr", "final rel loss (geo-mean)", "min", "max", "reached 1e-3"]
ACC_HEADERS = ["problem", "optimizer", "lr", "micro-batches", "final rel loss (geo-mean)", "min", "max"]


def mom_rows(out):
    rows = []
    for kind, e in out["sgd_momentum"].items():
        for mom, v in e.items():
            fl = v["summary"]["final_rel_loss"]
            rows.append([kind, mom, v["best_lr"], fl["mean"], fl["min"], fl["max"],
                         f"{v['summary']['n_reached_threshold']}/{fl['n']}"])
    return rows


def acc_rows(out):
    rows = []
    for kind, e in out["accumulation"].items():
        for label, v in e.items():
            for a, sm in v.items():
                if a == "lr":
                    continue
                fl = sm["final_rel_loss"]
                rows.append([kind, label, v["lr"], a, fl["mean"], fl["min"], fl["max"]])
    return rows


def report(out, log=print):
    log("\n== AdaPreLoRA-SGD with heavy-ball momentum (conditioning problems) ==")
    log(C.format_table(MOM_HEADERS, mom_rows(out)))
    log("\n== gradient accumulation: one batch of 64 split into micro-batches ==")
    log(C.format_table(ACC_HEADERS, acc_rows(out)))
