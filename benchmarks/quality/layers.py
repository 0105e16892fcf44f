"""Which layers carry LoRA, on the built-in model: `--lora_layers attn` (the default) beside `attn-ff`
(kohya's default set) and LoCon, every other setting the DreamBooth suite's (suite 4, `dreambooth.py`:
its subjects, judge, steps, rank, batch and text-encoder setting, AdaPreLoRA at one lr), the same
seeds for every preset, so the seed-paired differences are what the presets change.

    python -m benchmarks.quality.layers                       # attn, attn-ff; crescent; seeds 0 1 2
    python -m benchmarks.quality.layers --presets attn attn-ff+conv4 --seeds 0 1 2 3 4

Prints a table and writes benchmarks/results/quality_layers.json.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np

from . import common as C
from . import dreambooth as Q
from . import stats

PRESETS = {"attn": {}, "attn-ff": {"lora_layers": "attn-ff"},
           "attn-ff+conv4": {"lora_layers": "attn-ff", "conv_rank": 4, "conv_alpha": 4.0}}


def run(presets: list[str], seeds: list[int], subject_name: str, lr: float, optimizer: str, profile: str,
        log=print) -> dict:
    from adaprelora.tiny_t2i import TINY_SD_DIR

    work = tempfile.mkdtemp(prefix="quality-layers-")
    try:
        base_prof = Q.PROFILES[profile]
        ev = Q.Evaluator(TINY_SD_DIR, base_prof)
        subject = Q.builtin_subject(subject_name, work)
        base = ev.score(subject, None)
        base.pop("images"), base.pop("prompts")
        cfg = Q.config_for(optimizer)
        rows: dict[str, list] = {}
        for seed in seeds:
            for name in presets:
                prof = dict(base_prof, train_overrides=PRESETS[name], checkpoint_every=base_prof["steps"])
                r = Q.run_one(ev, TINY_SD_DIR, subject, cfg, lr, seed, prof, work)
                r["prior_kept"] = r["prior"] / base["prior"] if base["prior"] else None
                rows.setdefault(name, []).append(r)
                log(f"  {name:14s} seed {seed}: fidelity {C._fmt(r['subject_fidelity'])} sim {r['similarity']:.3f} "
                    f"prior kept {C._fmt(r['prior_kept'])} ({r['train_s']:.0f} s training)")
        result = {"suite": "layers", "profile": profile, "machine": C.machine_info(), "subject": subject_name,
                  "optimizer": optimizer, "lr": lr, "seeds": seeds, "steps": base_prof["steps"], "base": base,
                  "presets": {n: {"overrides": PRESETS[n], "runs": [{k: r[k] for k in
                              ("seed", "subject_fidelity", "similarity", "background", "prior", "prior_kept", "train_s")}
                              for r in rs]} for n, rs in rows.items()}}
        reference = presets[0]
        log(f"\n| preset | subject fidelity | similarity | prior kept | paired vs {reference}: fidelity, prior kept |")
        log("|---|---|---|---|---|")
        for name, rs in rows.items():
            line = [f"| {name}"] + [_mean_spread([r[k] for r in rs]) for k in ("subject_fidelity", "similarity",
                                                                             "prior_kept")]
            if name != reference and len(rs) > 1:
                paired = []
                for key in ("subject_fidelity", "prior_kept"):
                    by_seed = lambda runs: {r["seed"]: r[key] for r in runs}  # noqa: E731
                    diff = stats.paired_interval(by_seed(rs), by_seed(rows[reference]))
                    paired.append(stats.interval_text(diff))
                    result["presets"][name][f"paired_{key}"] = diff
                line.append(", ".join(paired))
            else:
                line.append("")
            log(" | ".join(line) + " |")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mean_spread(values: list) -> str:
    """`mean +- std` of the scores a run has (the smoke profile scores too few images for some)."""
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.3f} +- {np.std(values):.3f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["attn", "attn-ff"], choices=list(PRESETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--subject", default="crescent")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--optimizer", default="adaprelora")
    parser.add_argument("--profile", default="quick", choices=list(Q.PROFILES))
    args = parser.parse_args()
    t0 = time.perf_counter()
    result = run(args.presets, args.seeds, args.subject, args.lr, args.optimizer, args.profile)
    result["wall_s"] = time.perf_counter() - t0
    print(f"wrote {C.write_json(result, 'layers', args.profile)}")


if __name__ == "__main__":
    main()
