"""What the held-out loss's lr means for what users see: DreamBooth runs at the app's defaults for the
built-in model (`dreambooth-heldout`'s training, same data and seeds), each scored both ways.

The held-out denoising loss (`benchmarks/quality/heldout.py`) ranks optimizers finely, but the app's
defaults were chosen by the judge's subject fidelity on generated images. Before a default moves to
the held-out loss's best lr, this checks that the subject still shows in the images at that lr:
per run, the held-out subject and prior losses and the judge's subject fidelity, background and
prior (all three right on ordinary prompts).

    python -m benchmarks.quality.judge_check --runs adamw@2.5e-4 adamw@2e-3 adaprelora@2e-3 \\
        --subject heart --seed 0

Results are appended to `benchmarks/results/quality_dreambooth_judge_check.json`;
`--report` prints every optimizer against AdamW at the same lr, paired by (subject, seed), with
bootstrap 95% intervals.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import Optional

from . import common as C
from . import heldout as H
from . import stats

OUT = os.path.join(os.path.dirname(__file__), "..", "results", "quality_dreambooth_judge_check.json")


# The judge's settings of every judged run here: 7 recontextualisation backgrounds x 3 trigger-prompt
# images, 28 ordinary prompts, DDIM 25 steps, guidance 5 (`judge` below; the smoke tests pass fewer).
JUDGE = dict(per_background=3, prior_prompts=28, num_inference_steps=25, guidance_scale=5.0)


def run(label: str, lr: float, subject: str, seed: int, scorer: "H.Scorer", judge, work_dir: str, *,
        model_dir: Optional[str] = None, prof: Optional[dict] = None, judge_settings: Optional[dict] = None) -> dict:
    """One `dreambooth-heldout` run (`heldout.run_one`: the app's defaults, held-out subject and prior
    losses) whose LoRA is also judged on generated images: subject fidelity, background, prior."""
    from adaprelora.tiny_t2i import TINY_SD_DIR
    from adaprelora.tiny_t2i.personalise import evaluate_lora

    settings = {**JUDGE, **(judge_settings or {})}

    def judged(lora_dir: str) -> dict:
        j = evaluate_lora(scorer.pipe, judge, subject, lora_dir=lora_dir, seed=seed, **settings)
        return {"subject_fidelity": j["subject_fidelity"], "background": j["background"], "prior": j["prior"],
                "similarity": j["similarity"], "n_images": j["n"]}

    t0 = time.perf_counter()
    row = H.run_one(scorer, model_dir or TINY_SD_DIR, subject, H.config_for(label), lr, seed, "judge",
                    prof or H.PROFILES["quick"], work_dir, extra_scores=judged)
    row["seconds"] = time.perf_counter() - t0
    return row


def report(path: str = OUT) -> list:
    """Rows of (optimizer, lr, runs, means, paired differences vs AdamW at the same lr)."""
    runs = json.load(open(path))["runs"]
    metrics = (("subject_fidelity", False), ("subject_loss", True), ("prior_loss", True), ("prior", False))
    rows = []
    for (label, lr) in dict.fromkeys((r["config"], r["lr"]) for r in runs):
        mine = [r for r in runs if (r["config"], r["lr"]) == (label, lr)]
        cells = [label, lr, len(mine)] + [sum(r[m] for r in mine) / len(mine) for m, _ in metrics]
        for m, relative in metrics:
            base = {(r["subject"], r["seed"]): r[m] for r in runs if (r["config"], r["lr"]) == ("adamw", lr)}
            iv = None if label == "adamw" else stats.paired_interval({(r["subject"], r["seed"]): r[m] for r in mine},
                                                                      base, relative=relative)
            cells.append("-" if iv is None else stats.interval_text(iv, None if relative else 3))
        rows.append(cells)
    print(C.format_table(["optimizer", "lr", "runs", "subject fidelity", "held-out subject loss", "held-out prior loss",
                          "prior (all three)", "fidelity vs AdamW", "subject loss vs AdamW", "prior loss vs AdamW",
                          "prior vs AdamW"], rows))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="print the paired table of the results file and stop")
    ap.add_argument("--runs", nargs="+", help="LABEL@LR, e.g. adamw@2.5e-4")
    ap.add_argument("--subject", default="heart")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    if args.report or not args.runs:
        report(args.out)
        return 0

    import torch

    from adaprelora.tiny_t2i import TINY_SD_DIR
    from adaprelora.tiny_t2i.judge import load_judge

    torch.set_num_threads(args.threads)
    work_dir = tempfile.mkdtemp(prefix="judge-check-")
    try:
        scorer = H.Scorer(TINY_SD_DIR, H.PROFILES["quick"], work_dir)
        judge = load_judge(os.path.join(TINY_SD_DIR, "judge"))
        base = evaluate_lora_base(scorer, judge, args.subject, args.seed)
        rows = []
        for item in args.runs:
            label, lr = item.split("@")
            row = run(label, float(lr), args.subject, args.seed, scorer, judge, work_dir)
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            _save(args.out, base, row)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(C.format_table(["optimizer", "lr", "held-out subject loss", "held-out prior loss", "subject fidelity",
                          "background", "prior (all three)"],
                         [[r["config"], r["lr"], r["subject_loss"], r["prior_loss"], r["subject_fidelity"],
                           r["background"], r["prior"]] for r in rows]))
    return 0


def evaluate_lora_base(scorer, judge, subject: str, seed: int) -> dict:
    """The base model's scores (no LoRA), the reference for the prior columns."""
    from adaprelora.tiny_t2i.personalise import evaluate_lora

    judged = evaluate_lora(scorer.pipe, judge, subject, seed=seed, **JUDGE)
    return {"subject": subject, **scorer.score(subject, None), "subject_fidelity": judged["subject_fidelity"],
            "prior": judged["prior"]}


def _save(path: str, base: dict, row: dict) -> None:
    data = json.load(open(path)) if os.path.isfile(path) else {"machine": C.machine_info(), "base": {}, "runs": []}
    data["base"][base["subject"]] = base
    data["runs"].append(row)
    with open(path + ".tmp", "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    raise SystemExit(main())
