"""A first look at AdaPreLoRA's rule options (docs/algorithm.md, "Options of the rule") beside AdamW:
an lr sweep on the MiniLM classification suite (`benchmarks.quality.classification`, its quick
profile: 200 steps, batch 16, LoRA r 8 on query/value of the top 2 layers), one seed. It only says
which options are worth a confirmation run with seeds; it is no ranking.

    python -m benchmarks.rule_variants_sweep [--seed 0] [--configs a,b] [--lrs 1e-3,3e-3] [--out FILE.json]

Prints one row per (option, lr): validation accuracy (the split the suite picks lrs by), test
accuracy on held-out templates and on seen templates, the train loss at the budget; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.quality import classification as S
from benchmarks.quality import common as C

SGD = {"stats": "exact"}
EMA = {**SGD, "momentum_before_solve": True}
# label -> (factory name, options, lr grid). The grids sit around each option's best lr in the
# suite's earlier quick runs (AdamW 3e-3, AdaPreLoRA 1e-2, momentum into the solve 1e-3 at the grid's
# bottom); with the relative step the lr multiplies max(1e-3, RMS(s B A)), so its grid sits ~300x up.
VARIANTS = {
    "adamw": ("adamw", {}, (1e-3, 3e-3, 1e-2)),
    "adaprelora": ("adaprelora", {"stats": "exact"}, (3e-3, 1e-2, 3e-2)),
    "sgd": ("adaprelora-sgd", SGD, (3e-3, 1e-2, 3e-2)),
    "sgd-root": ("adaprelora-sgd", {**SGD, "energy_ema": "root"}, (3e-3, 1e-2, 3e-2)),
    "ema": ("adaprelora-sgd", EMA, (3e-4, 1e-3, 3e-3)),
    "ema-root": ("adaprelora-sgd", {**EMA, "energy_ema": "root"}, (3e-4, 1e-3, 3e-3)),
    "ema-relative": ("adaprelora-sgd", {**EMA, "relative_step": True}, (0.1, 0.3, 1.0)),
    "ema-noclip": ("adaprelora-sgd", {**EMA, "clip_threshold": None}, (3e-4, 1e-3, 3e-3)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default=",".join(VARIANTS), help="comma-separated labels of VARIANTS")
    parser.add_argument("--lrs", default=None, help="comma-separated lrs for every config given (default: each one's grid)")
    parser.add_argument("--out", default=os.path.join(C.RESULTS_DIR, "rule_variants_sweep.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    prof = S.PROFILES["quick"]
    t0 = time.time()
    rows = []
    for label in args.configs.split(","):
        name, kwargs, grid = VARIANTS[label]
        grid = tuple(float(x) for x in args.lrs.split(",")) if args.lrs else grid
        family = "adam" if name in ("adamw", "adaprelora") else "sgd"
        for lr in grid:
            run = S.run_one(C.OptConfig(label, name, kwargs, family), lr, args.seed, prof)
            row = {k: run[k] for k in ("config", "lr", "seed", "val_acc", "test_acc", "test_seen_acc",
                                       "final_train_loss", "nonfinite")}
            row["kwargs"] = kwargs
            rows.append(row)
            print(f"{label:14s} lr {lr:<8g} val {row['val_acc']} test {row['test_acc']} "
                  f"seen {row['test_seen_acc']} loss {row['final_train_loss']}", flush=True)
            _write(args, prof, rows, t0)  # after every run: an interrupted sweep keeps what it measured
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


def _write(args, prof, rows, t0) -> None:
    result = {"suite": "classification (MiniLM) quick profile, one seed", "machine": C.machine_info(),
              "profile": {k: prof[k] for k in ("steps", "batch", "n_train", "n_val", "n_test", "n_test_seen")},
              "setup": S.SETUP, "runs": rows, "wall_s": time.time() - t0,
              "command": f"python -m benchmarks.rule_variants_sweep --seed {args.seed} --configs {args.configs}"
                         + (f" --lrs {args.lrs}" if args.lrs else "") + f" --out {args.out}"}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
