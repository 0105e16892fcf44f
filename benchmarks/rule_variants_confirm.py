"""Confirmation of the rule options that the one-seed sweep (`rule_variants_sweep.py`) picked: each
option at the lr the sweep chose on seed 0, run on other seeds, with the seed-paired difference to
AdamW and its bootstrap 95% interval (`benchmarks.quality.stats`). Each run is one
`rule_variants_sweep.py --seed S --configs LABEL --lrs LR` call (so the same code trains every
option); this script starts them, or only gathers their JSON files with `--gather`.

    python -m benchmarks.rule_variants_confirm --seeds 1 2 3            # runs, then the table
    python -m benchmarks.rule_variants_confirm --seeds 1 2 3 --gather DIR

Writes benchmarks/results/rule_variants_confirm.json.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks.quality import common as C
from benchmarks.quality import stats

# The sweep's picks on seed 0 (benchmarks/results/rule_variants_sweep*.json, by validation accuracy).
BEST_LR = {"adamw": 3e-3, "adaprelora": 1e-2, "sgd": 3e-3, "ema": 1e-3, "ema-root": 3e-3}
METRICS = ("val_acc", "test_acc")


def _run(label: str, seed: int, folder: str) -> None:
    out = os.path.join(folder, f"{label}_{seed}.json")
    subprocess.run([sys.executable, "-m", "benchmarks.rule_variants_sweep", "--seed", str(seed), "--configs", label,
                    "--lrs", str(BEST_LR[label]), "--out", out], check=True, timeout=1800)


def gather(folder: str, seeds: list[int]) -> dict:
    """{label: {seed: run}} from the sweep's JSON files in `folder`."""
    runs: dict[str, dict] = {}
    for path in glob.glob(os.path.join(folder, "*.json")):
        for run in json.load(open(path))["runs"]:
            if run["seed"] in seeds and run["config"] in BEST_LR and run["lr"] == BEST_LR[run["config"]]:
                runs.setdefault(run["config"], {})[run["seed"]] = run
    return runs


def report(runs: dict, seeds: list[int]) -> dict:
    result = {"suite": "classification (MiniLM) quick profile", "seeds": seeds, "best_lr": BEST_LR,
              "machine": C.machine_info(), "options": {}}
    print("| option | lr | val acc | test acc (unseen templates) | paired vs AdamW: val | paired vs AdamW: test |")
    print("|---|---|---|---|---|---|")
    for label, by_seed in runs.items():
        row = {m: [by_seed[s][m] for s in sorted(by_seed)] for m in METRICS}
        entry = {"lr": BEST_LR[label], "runs": [by_seed[s] for s in sorted(by_seed)]}
        cells = [f"{np.mean(row[m]):.3f} +- {np.std(row[m]):.3f}" for m in METRICS]
        paired = []
        for m in METRICS:
            if label == "adamw":
                paired.append("")
                continue
            iv = stats.paired_interval({s: r[m] for s, r in by_seed.items()},
                                       {s: r[m] for s, r in runs["adamw"].items()})
            entry[f"paired_{m}"] = iv
            paired.append(stats.interval_text(iv))
        result["options"][label] = entry
        print(f"| {label} | {BEST_LR[label]:g} | " + " | ".join(cells + paired) + " |")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--gather", default=None, help="a folder of the runs' JSON files (no new runs)")
    parser.add_argument("--out", default=os.path.join(C.RESULTS_DIR, "rule_variants_confirm.json"))
    args = parser.parse_args()
    folder = args.gather or tempfile.mkdtemp(prefix="rule-variants-confirm-")
    if not args.gather:
        for seed in args.seeds:
            for label in BEST_LR:
                _run(label, seed, folder)
    result = report(gather(folder, args.seeds), args.seeds)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
