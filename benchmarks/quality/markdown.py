"""Markdown tables of the committed results for docs/results.md:

    python -m benchmarks.quality.markdown [benchmarks/results]
"""
from __future__ import annotations

import json
import os
import sys

from . import classification, conditioning, dreambooth, dreambooth_others, e2e, gsm8k, rank_alpha, studies
from .common import markdown_table


def main(folder: str = "benchmarks/results") -> None:
    path = os.path.join(folder, "quality_conditioning.json")
    if os.path.exists(path):
        res = json.load(open(path))
        for kind, entry in res["problems"].items():
            print(f"\n### Conditioning, {kind} ({res['steps']} steps, {len(res['seeds'])} seeds, wall "
                  f"{res['wall_s']:.0f} s)\n")
            print(markdown_table(conditioning.TABLE_HEADERS, conditioning.table_rows(entry)))
            if entry["damping"]:
                print(f"\nDamping sensitivity ({kind}; lr re-tuned on 3 grid points around the damping-0.1 best):\n")
                print(markdown_table(conditioning.DAMPING_HEADERS, conditioning.damping_rows(entry)))
    path = os.path.join(folder, "quality_studies.json")
    if os.path.exists(path):
        res = json.load(open(path))
        print(f"\n### Studies ({res['steps']} steps, {len(res['seeds'])} seeds, wall {res['wall_s']:.0f} s)\n")
        print(markdown_table(studies.MOM_HEADERS, studies.mom_rows(res)))
        print()
        print(markdown_table(studies.ACC_HEADERS, studies.acc_rows(res)))
    path = os.path.join(folder, "quality_rank_alpha.json")
    if os.path.exists(path):
        res = json.load(open(path))
        ps = res["profile_settings"]
        print(f"\n### Rank and alpha ({ps['steps']} steps, {len(ps['seeds'])} seeds, wall {res['wall_s']:.0f} s)\n")
        print(markdown_table(rank_alpha.SPAN_HEADERS, rank_alpha.span_rows(res)))
        print()
        print(markdown_table(rank_alpha.HEADERS, rank_alpha.table_rows(res)))
    path = os.path.join(folder, "quality_classification.json")
    if os.path.exists(path):
        res = json.load(open(path))
        classification.add_paired(res)  # results written before the paired intervals get them here
        ps = res["profile_settings"]
        print(f"\n### Classification ({ps['steps']} steps x batch {ps['batch']}, {len(ps['seeds'])} seeds, "
              f"test {res['data']['test']} held-out-template sentences"
              + (f" and {res['data']['test_seen']} new sentences of the training templates" if "test_seen" in res["data"]
                 else "") + f"; differences to AdamW paired by seed with bootstrap 95% intervals; wall "
              f"{res['wall_s']:.0f} s)\n")
        print(markdown_table(classification.TABLE_HEADERS, classification.table_rows(res)))
        if res.get("parts"):
            print("\nRun in parts, merged by config (configs, code version, wall time):\n")
        for part in res.get("parts", []):
            print(f"- {', '.join(part['configs'])}: commit {(part['commit'] or '?')[:7]}, {part['wall_s']:.0f} s, "
                  f"finished {part['finished']}")
        if res["damping"]:
            print("\nDamping sensitivity (at the damping-0.1 best lr):\n")
            print(markdown_table(classification.DAMPING_HEADERS, classification.damping_rows(res)))
        rows = classification.sweep_rows(res)
        if rows:
            print("\nLearning-rate sweep (seed 0; val accuracy / unseen-template test accuracy / seen-template test "
                  "accuracy / final train loss):\n")
            print(markdown_table(["optimizer"] + [f"lr {i + 1}" for i in range(len(rows[0]) - 1)], rows))
    for name in ("quality_dreambooth.json", "quality_dreambooth_ablations.json", "quality_dreambooth_others1.json",
                 "quality_dreambooth_others2.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            res = json.load(open(path))
            dreambooth.add_paired(res)
            prof = res["setup"]["profile"]
            print(f"\n### DreamBooth on tiny-sd ({name}: {prof['steps']} steps, lr tuned on "
                  f"{', '.join(res['tune_subjects'])}, confirmed on {', '.join(res['confirm_subjects'])} x "
                  f"{len(prof['seeds'])} seeds, wall {res['wall_s']:.0f} s)\n")
            print(f"Base model: prior (all three right on 28 ordinary prompts) {res['base_prior']:.3f}; subject "
                  "fidelity " + ", ".join(f"{k} {v['subject_fidelity']:.2f}" for k, v in res["base"].items()) + ".\n")
            print(markdown_table(dreambooth.TABLE_HEADERS, dreambooth.table_rows(res)))
            print("\nLearning-rate sweep on the tuning subjects (seed 0; subject fidelity / similarity / prior):\n")
            rows = []
            for label, o in res["optimizers"].items():
                cells = []
                for lr, runs in o["sweep"].items():
                    fid = sum(r["subject_fidelity"] or 0 for r in runs) / len(runs)
                    sim = sum(r["similarity"] for r in runs) / len(runs)
                    pri = sum(r["prior"] or 0 for r in runs) / len(runs)
                    cells.append(f"{lr}: {fid:.2f} / {sim:.3f} / {pri:.2f}")
                rows.append([label] + cells)
            width = max(len(r) for r in rows)
            rows = [r + [""] * (width - len(r)) for r in rows]
            print(markdown_table(["optimizer"] + [f"lr {i + 1}" for i in range(width - 1)], rows))
    path = os.path.join(folder, "quality_dreambooth_others.json")
    if os.path.exists(path):
        res = json.load(open(path))
        size = (f" ({res['own_runs']} runs of this suite, {res['own_run_s_sum'] / 3600:.1f} CPU-hours)"
                if "own_runs" in res else "")
        print(f"\n### Other optimizers at the app's defaults{size}\n")
        print(markdown_table(dreambooth_others.TUNING_HEADERS, dreambooth_others.tuning_table(res)))
        print()
        print(markdown_table(dreambooth_others.CONFIRM_HEADERS, dreambooth_others.confirmation_table(res)))
    path = os.path.join(folder, "quality_gsm8k.json")
    if os.path.exists(path):
        res = json.load(open(path))
        ps = res["profile_settings"]
        print(f"\n### GSM8K-format ({ps['steps']} steps x batch {ps['batch']}, evaluated on "
              f"{res['data']['evaluated']} of {res['data']['test_total']} held-out problems, wall {res['wall_s']:.0f} s)\n")
        print(markdown_table(gsm8k.TABLE_HEADERS, gsm8k.table_rows(res)))
    path = os.path.join(folder, "quality_e2e.json")
    if os.path.exists(path):
        res = json.load(open(path))
        ps = res["profile_settings"]
        print(f"\n### E2E-style data-to-text ({ps['steps']} steps x batch {ps['batch']}, {res['data']['test']} test "
              f"records x {res['data']['refs_per_record']} references, {len(ps['seeds'])} seeds; differences to AdamW "
              f"paired by seed with bootstrap 95% intervals; wall {res['wall_s']:.0f} s)\n")
        print(markdown_table(e2e.TABLE_HEADERS, e2e.table_rows(res)))
        if res.get("parts"):
            print("\nRun in parts, merged by config (configs, code version, wall time):\n")
        for part in res.get("parts", []):
            print(f"- {', '.join(part['configs'])}: commit {(part['commit'] or '?')[:7]}, {part['wall_s']:.0f} s, "
                  f"finished {part['finished']}")
        rows = e2e.sweep_rows(res)
        if rows:
            print("\nLearning-rate sweep (seed 0; validation BLEU / validation loss):\n")
            print(markdown_table(["optimizer"] + [f"lr {i + 1}" for i in range(len(rows[0]) - 1)], rows))


if __name__ == "__main__":
    main(*sys.argv[1:])
