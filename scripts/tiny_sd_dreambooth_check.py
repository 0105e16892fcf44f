"""Measure DreamBooth on the built-in model at its default settings: for each reserved subject, train
a LoRA on 5 drawn images (in-process, the trainer's own code) and let the judge score what the base
model and the LoRA draw (subject fidelity, background asked for, similarity, ordinary prompts).

    python scripts/tiny_sd_dreambooth_check.py                     # the four subjects: a table
    python scripts/tiny_sd_dreambooth_check.py heart crescent --seed 0 1 2 --record
                                                                   # three LoRAs each, into the model card

About 3 minutes per subject and seed on one CPU thread. `--record` writes the rows into the model folder's
`training_report.json` and rewrites its `README.md` (the model card's DreamBooth tables).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

DEFAULTS_SETTINGS = "defaults, `scripts/tiny_sd_dreambooth_check.py`"


def train_default_lora(subject: str, workdir: str, *, base_model: str, images: int = 5,
                       seed: int = 0, **overrides) -> str:
    """Train a LoRA on `images` drawn pictures of `subject` with `DREAMBOOTH_DEFAULTS` (and the
    captioned class scenes the app writes), in-process through the trainer; returns its folder."""
    from adaprelora.tiny_t2i.personalise import (
        DREAMBOOTH_DEFAULTS,
        trigger_prompt,
        write_class_images,
        write_subject_images,
    )
    from adaprelora.training.dreambooth import TrainConfig, train

    settings = {**DREAMBOOTH_DEFAULTS, **overrides}
    data, classes, out = (os.path.join(workdir, name) for name in ("images", "class", "lora"))
    write_subject_images(subject, data, count=images, seed=seed)
    if settings.get("with_prior_preservation"):
        write_class_images(classes, settings["num_class_images"])
    config = TrainConfig(pretrained_model_name_or_path=base_model, instance_data_dir=data,
                         instance_prompt=trigger_prompt("white"), output_dir=out, lr_warmup_steps=0, seed=seed,
                         class_data_dir=classes if settings.get("with_prior_preservation") else None,
                         checkpointing_steps=10**6, report_to="none", validation_prompt=None,
                         skip_export_check=True, **settings)
    for event in train(config):
        if event.done and "diffusers" not in event.outputs:
            raise RuntimeError(f"training {subject!r} wrote no LoRA: {event.message}")
    return out


def defaults_text() -> str:
    """The default settings in words, for the model card."""
    from adaprelora.tiny_t2i.personalise import DREAMBOOTH_DEFAULTS as d

    return (f"{d['max_train_steps']} steps, batch {d['train_batch_size']}, lr {d['learning_rate']:g} "
            f"({d['lr_scheduler']}), rank {d['rank']}, UNet" + (" + text encoder" if d["train_text_encoder"] else "")
            + f" LoRA, prior preservation on {d['num_class_images']} captioned scenes with class caption dropout "
            f"{d['class_caption_dropout_rate']:g}" + (f", min-SNR-{d['snr_gamma']:g} loss weighting" if d.get("snr_gamma") else ""))


def main(argv=None) -> int:
    from adaprelora.tiny_t2i import TINY_SD_DIR, scenes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("subjects", nargs="*", default=list(scenes.SUBJECTS),
                   help=f"reserved subjects (default: all of {', '.join(scenes.SUBJECTS)})")
    p.add_argument("--model", default=TINY_SD_DIR, help="the tiny-sd folder (default: the shipped one)")
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="seed(s) of the subject images and the training run: one LoRA per seed")
    p.add_argument("--prior_prompts", type=int, default=96,
                   help="ordinary prompts (no trigger word) the prior is scored on, base model and LoRAs alike")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--record", action="store_true", help="write the rows into the model card")
    a = p.parse_args(argv)
    unknown = [s for s in a.subjects if s not in scenes.SUBJECTS]
    if unknown:
        p.error(f"unknown subject {unknown[0]!r}; choose from: {', '.join(scenes.SUBJECTS)}")
    if a.prior_prompts < 1:
        p.error(f"--prior_prompts must be 1 or more, got {a.prior_prompts}")
    if not os.path.isfile(os.path.join(a.model, "model_index.json")):
        p.error(f"--model {a.model!r} is not a tiny-sd folder (no model_index.json)")

    import torch
    from diffusers import StableDiffusionPipeline

    from adaprelora.tiny_t2i.judge import load_judge
    from adaprelora.tiny_t2i.personalise import evaluate_lora
    from adaprelora.tiny_t2i.quality import BASE_SETTINGS, write_model_card

    torch.set_num_threads(a.threads)
    pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(os.path.join(a.model, "judge"))
    keys = ("subject_fidelity", "background", "similarity", "prior")
    rows = []
    print(f"{'subject':14s} {'model':6s} " + " ".join(f"{k:>16s}" for k in keys), flush=True)

    def add_row(subject: str, name: str, settings: str, lora_dir) -> None:
        # the same prompts and seeds for every row
        r = evaluate_lora(pipe, judge, subject, lora_dir=lora_dir, prior_prompts=a.prior_prompts)
        row = {"subject": subject, "settings": settings, **{k: round(float(r[k]), 3) for k in keys},
               "prior_prompts": a.prior_prompts}
        rows.append(row)
        print(f"{subject:14s} {name:6s} " + " ".join(f"{row[k]:16.3f}" for k in keys), flush=True)

    for subject in a.subjects:
        add_row(subject, "base", BASE_SETTINGS, None)
        for seed in a.seed:
            with tempfile.TemporaryDirectory(prefix="tiny-db-") as work:
                lora = train_default_lora(subject, work, base_model=a.model, seed=seed)
                add_row(subject, f"seed {seed}", f"{DEFAULTS_SETTINGS} (seed {seed})", lora)
    if a.record:
        import fcntl

        path = os.path.join(a.model, "training_report.json")
        with open(path, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # two runs on different subjects may finish together
            report = json.load(f)
            # A measured row replaces the one of the same subject and settings (seed); the others stay.
            measured = {(r["subject"], r["settings"]) for r in rows}
            kept = [r for r in report.get("dreambooth") or [] if (r["subject"], r["settings"]) not in measured]
            report["dreambooth"] = sorted(kept + rows, key=lambda r: (scenes.SUBJECTS.index(r["subject"]),
                                                                        r["settings"] != BASE_SETTINGS, r["settings"]))
            report["dreambooth_settings"] = defaults_text()
            f.seek(0)
            f.truncate()
            json.dump(report, f, indent=2)
            write_model_card(a.model, report)
        print(f"recorded {len(rows)} rows in {path} and {os.path.join(a.model, 'README.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
