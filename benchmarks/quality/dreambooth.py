"""Suite 4, personalisation: DreamBooth LoRA on the built-in model (assets/tiny-sd), scored by its judge.

Subjects the base model never saw (the reserved heart, crescent, striped ring and arrow, 5 images
each; or any folders given with `--subjects DIR`, one sub-folder of images per subject) are taught
with the trainer's own code path (`adaprelora.training.dreambooth.train`), every optimizer with the
same steps, rank, batch, schedule and text-encoder setting (the built-in model's DreamBooth
defaults). Protocol: the learning rate is swept on the *tuning* subjects (seed 0) and picked by
subject fidelity (ties: similarity); each optimizer then runs at its picked lr on the *confirmation*
subjects with every seed, and only those runs are reported, so the lr is never chosen on the data it
is scored on. Prodigy runs at its documented lr 1.0 only.

Metrics, from the judge on generated images (DDIM, 25 steps, guidance 5):
- subject fidelity: the fraction of trigger-prompt images the judge classifies as the subject
  (reserved subjects only) and the embedding similarity to the subject's own images (any subject,
  like CLIP-I / DINO scores); both also at every checkpoint, for fidelity against step;
- prompt fidelity: the fraction of recontextualisation prompts ("a sks shape on a {colour}
  background", every colour but the subject's) whose background is the one asked for;
- prior kept: the judge's all-three score on ordinary prompts without the trigger word, as a
  fraction of the base model's (1.0: no drift).
Also: steps to reach 80% subject fidelity (first checkpoint at or above it), seconds per step,
and the optimizer's saved state bytes.

    python -m benchmarks.quality dreambooth-nopp --quick     # < 30 min on 2 CPU cores
    python -m benchmarks.quality dreambooth-nopp --full      # every optimizer name, 2 + 2 subjects
    python -m benchmarks.quality dreambooth-nopp --quick --subjects my_subjects/
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import common as C
from . import stats

PROFILES = {
    "smoke": dict(steps=4, checkpoint_every=2, tune=("heart",), confirm=("crescent",), seeds=(0,), lr_points=1,
                  configs=("adamw", "adaprelora"), per_background=1, prior_prompts=4, curve_per_background=1,
                  num_inference_steps=2),
    "quick": dict(steps=400, checkpoint_every=100, tune=("heart",), confirm=("crescent", "striped ring"),
                  seeds=(0, 1, 2), lr_points=3, configs=("adaprelora", "adamw", "prodigy"), per_background=2,
                  prior_prompts=28, curve_per_background=1, num_inference_steps=25),
    "full": dict(steps=400, checkpoint_every=50, tune=("heart", "arrow"), confirm=("crescent", "striped ring"),
                 seeds=(0, 1, 2), lr_points=3,
                 configs=("adaprelora", "adamw", "prodigy", "adafactor", "schedule-free", "adamw8bit", "loraplus",
                          "scaled-adamw", "lora-pro", "adaprelora-tangent", "adaprelora-raw", "adaprelora@d1",
                          "adaprelora-sgd", "adaprelora-ema"),
                 per_background=3, prior_prompts=28, curve_per_background=1, num_inference_steps=25),
}
# Factor-space lrs around the built-in model's AdamW-type default (5e-3); W-space step sizes for
# the sgd family.
LR_GRIDS = {"adam": (1e-3, 3e-3, 1e-2), "sgd": (3e-3, 1e-2, 3e-2)}
GUIDANCE = 5.0
FIDELITY_TARGET = 0.8


@dataclass
class Subject:
    """A subject to teach: its name, a folder of training images, reference images for similarity,
    and the judge's class when it is one the judge knows."""

    name: str
    images_dir: str
    references: list
    judge_class: Optional[str]
    backgrounds: list


def builtin_subject(name: str, work_dir: str) -> Subject:
    from adaprelora.tiny_t2i import scenes
    from adaprelora.tiny_t2i.personalise import recontext_backgrounds, write_subject_images

    folder = os.path.join(work_dir, "subjects", name.replace(" ", "_"))
    write_subject_images(name, folder, count=5, seed=0)
    refs = [scenes.render(s) for s in scenes.subject_scenes(name, 8, seed=99)]
    return Subject(name, folder, refs, name, recontext_backgrounds(name))


def folder_subjects(root: str) -> list[Subject]:
    """One subject per sub-folder of `root` (its images, optional sidecar .txt captions; without
    captions the instance prompt "a sks shape" is used). The judge's class applies when the
    folder is named after a shape it knows ("heart", "striped_ring", ...)."""
    from PIL import Image

    from adaprelora.tiny_t2i import scenes

    out = []
    for folder in sorted(glob.glob(os.path.join(root, "*"))):
        if not os.path.isdir(folder):
            continue
        files = sorted(f for f in glob.glob(os.path.join(folder, "*"))
                       if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp")))
        if not files:
            continue
        refs = [Image.open(f).convert("RGB").resize((64, 64)) for f in files]
        name = os.path.basename(folder).replace("_", " ")
        out.append(Subject(name, folder, refs, name if name in scenes.ALL_SHAPES else None, list(scenes.COLOURS)))
    if not out:
        raise SystemExit(f"--subjects {root}: no sub-folder with images (expected {root}/<subject>/*.png)")
    return out


def config_for(label: str) -> C.OptConfig:
    """A label of `common.CONFIGS_BY_LABEL`, optionally with "@d<damping>" (e.g. adaprelora@d1)."""
    base, _, damping = label.partition("@d")
    cfg = C.CONFIGS_BY_LABEL[base]
    return C.with_damping(cfg, float(damping)) if damping else cfg


def lr_grid(cfg: C.OptConfig, points: int) -> tuple:
    if cfg.name in C.FIXED_LRS:
        return C.FIXED_LRS[cfg.name]
    grid = LR_GRIDS["sgd" if cfg.family == "sgd" else "adam"]
    start = max(0, (len(grid) - points) // 2)
    return grid[start:start + points]


class Evaluator:
    """The pipeline and judge, loaded once; scores a LoRA folder (or the base model)."""

    def __init__(self, model_dir: str, prof: dict):
        from diffusers import StableDiffusionPipeline

        from adaprelora.tiny_t2i.judge import load_judge

        self.pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
        self.pipe.set_progress_bar_config(disable=True)
        self.judge = load_judge(os.path.join(model_dir, "judge"))
        self.prof = prof
        self._base: dict = {}

    def base_curve(self, subject: Subject) -> dict:
        """The base model's step-0 point of the fidelity curve (the same for every run of a subject)."""
        if subject.name not in self._base:
            self._base[subject.name] = self.score(subject, None, curve=True)
        return self._base[subject.name]

    def score(self, subject: Subject, lora_dir: Optional[str], *, curve: bool = False) -> dict:
        from adaprelora.tiny_t2i.personalise import evaluate_subject

        p = self.prof
        return evaluate_subject(
            self.pipe, self.judge, subject.references, subject=subject.judge_class, backgrounds=subject.backgrounds,
            lora_dir=lora_dir, per_background=p["curve_per_background"] if curve else p["per_background"],
            prior_prompts=0 if curve else p["prior_prompts"], seed=0, guidance_scale=GUIDANCE,
            num_inference_steps=p["num_inference_steps"])


def train_config(model_dir: str, subject: Subject, cfg: C.OptConfig, lr: float, seed: int, prof: dict, out: str):
    from adaprelora.tiny_t2i.personalise import CLASS_NOUN, DREAMBOOTH_DEFAULTS, TRIGGER
    from adaprelora.training.dreambooth import TrainConfig

    d = DREAMBOOTH_DEFAULTS
    return TrainConfig(
        pretrained_model_name_or_path=model_dir, instance_data_dir=subject.images_dir,
        instance_prompt=f"a {TRIGGER} {CLASS_NOUN}", output_dir=out, resolution=d["resolution"],
        train_batch_size=d["train_batch_size"], max_train_steps=prof["steps"], learning_rate=lr, rank=d["rank"],
        lr_scheduler=d["lr_scheduler"], lr_warmup_steps=0, train_text_encoder=d["train_text_encoder"],
        optimizer=cfg.name, optimizer_args=dict(cfg.kwargs), checkpointing_steps=prof["checkpoint_every"],
        report_to="none", seed=seed, skip_export_check=True, **prof.get("train_overrides", {}))


def run_one(ev: Evaluator, model_dir: str, subject: Subject, cfg: C.OptConfig, lr: float, seed: int, prof: dict,
            work_dir: str, keep_images: bool = False) -> dict:

    out = tempfile.mkdtemp(prefix="db-", dir=work_dir)
    try:
        losses, steps_per_sec, train_s = C.run_dreambooth(train_config(model_dir, subject, cfg, lr, seed, prof, out))
        curve_steps, curve_fid, curve_sim = [0], [], []
        base = ev.base_curve(subject)
        curve_fid.append(base["subject_fidelity"])
        curve_sim.append(base["similarity"])
        ckpts = sorted(glob.glob(os.path.join(out, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
        state_bytes = None
        for ck in ckpts:
            step = int(ck.rsplit("-", 1)[1])
            opt_files = glob.glob(os.path.join(ck, "optimizer*.bin")) + glob.glob(os.path.join(ck, "optimizer*.safetensors"))
            state_bytes = sum(os.path.getsize(f) for f in opt_files) or state_bytes
            if step >= prof["steps"]:
                continue  # the final weights are scored below, in full
            r = ev.score(subject, ck, curve=True)
            curve_steps.append(step)
            curve_fid.append(r["subject_fidelity"])
            curve_sim.append(r["similarity"])
        final = ev.score(subject, out)
        curve_steps.append(prof["steps"])
        curve_fid.append(final["subject_fidelity"])
        curve_sim.append(final["similarity"])
        images = final.pop("images")
        prompts = final.pop("prompts")
        reached = next((s for s, f in zip(curve_steps, curve_fid) if f is not None and f >= FIDELITY_TARGET), None)
        row = {"config": cfg.label, "subject": subject.name, "lr": lr, "seed": seed, **final,
               "curve_steps": curve_steps, "curve_fidelity": curve_fid, "curve_similarity": curve_sim,
               "steps_to_80": reached, "final_loss": float(np.mean(losses[-50:])) if losses else None,
               "train_s": train_s, "s_per_step": (1.0 / steps_per_sec) if steps_per_sec else None,
               "state_bytes": state_bytes}
        if keep_images:
            row["_images"], row["_prompts"] = images, prompts
        return row
    finally:
        shutil.rmtree(out, ignore_errors=True)


def summarize(runs: list, base_prior: Optional[float]) -> dict:
    def ms(key):
        return C.mean_spread([r[key] for r in runs if r[key] is not None]) if any(r[key] is not None for r in runs) else None

    kept = [r["prior"] / base_prior for r in runs if r["prior"] is not None and base_prior]
    reached = [r["steps_to_80"] for r in runs]
    return {"subject_fidelity": ms("subject_fidelity"), "similarity": ms("similarity"), "background": ms("background"),
            "prior": ms("prior"), "prior_kept": C.mean_spread(kept) if kept else None,
            "reached_80": sum(s is not None for s in reached), "runs": len(runs),
            "steps_to_80_median": float(np.median([s for s in reached if s is not None])) if any(s is not None for s in reached) else None,
            "s_per_step_median": float(np.median([r["s_per_step"] for r in runs if r["s_per_step"]])) if runs else None,
            "state_bytes": next((r["state_bytes"] for r in runs if r["state_bytes"]), None)}


def _pick(sweep: dict) -> float:
    def key(lr):
        rows = sweep[lr]
        fid = [r["subject_fidelity"] for r in rows if r["subject_fidelity"] is not None]
        sim = [r["similarity"] for r in rows]
        return (float(np.mean(fid)) if fid else 0.0, float(np.mean(sim)))

    return max(sweep, key=key)


def run_suite(profile: str = "quick", log=print, configs: Optional[list] = None, img_dir=None,
              subjects_dir: Optional[str] = None, model_dir: Optional[str] = None) -> dict:
    from adaprelora.tiny_t2i import TINY_SD_DIR

    prof = PROFILES[profile]
    model_dir = model_dir or TINY_SD_DIR
    configs = list(configs or prof["configs"])
    t_start = time.perf_counter()
    work_dir = tempfile.mkdtemp(prefix="quality-dreambooth-")
    try:
        ev = Evaluator(model_dir, prof)
        if subjects_dir:
            subjects = folder_subjects(subjects_dir)
            tune, confirm = subjects[:1], subjects[1:] or subjects[:1]
        else:
            tune = [builtin_subject(n, work_dir) for n in prof["tune"]]
            confirm = [builtin_subject(n, work_dir) for n in prof["confirm"]]
        base = {s.name: ev.score(s, None) for s in tune + confirm}
        for b in base.values():
            b.pop("images"), b.pop("prompts")
        base_prior = np.mean([b["prior"] for b in base.values()]) if base else None
        log(f"  base model: prior (all three right) {C._fmt(float(base_prior))}; subject fidelity "
            + ", ".join(f"{k} {C._fmt(v['subject_fidelity'])}" for k, v in base.items()))
        result = {"suite": "dreambooth", "profile": profile, "machine": C.machine_info(), "model": model_dir,
                  "setup": _setup(prof), "tune_subjects": [s.name for s in tune],
                  "confirm_subjects": [s.name for s in confirm], "base": base, "base_prior": base_prior,
                  "lr_selection": "sweep on the tuning subjects at seed 0, best mean subject fidelity (ties: similarity)",
                  "optimizers": {}}
        samples = {}
        for label in configs:
            cfg = config_for(label)
            grid = lr_grid(cfg, prof["lr_points"])
            sweep = {}
            for lr in grid:
                sweep[lr] = [run_one(ev, model_dir, s, cfg, lr, prof["seeds"][0], prof, work_dir) for s in tune]
                for r in sweep[lr]:
                    log(f"  {label:20s} tune {r['subject']:12s} lr={lr:<7g} fidelity {C._fmt(r['subject_fidelity'])} "
                        f"sim {r['similarity']:.3f} bg {r['background']:.2f} prior {C._fmt(r['prior'])} "
                        f"({r['train_s']:.0f} s)")
            best = _pick(sweep) if len(grid) > 1 else grid[0]
            runs = []
            for s in confirm:
                for seed in prof["seeds"]:
                    r = run_one(ev, model_dir, s, cfg, best, seed, prof, work_dir, keep_images=not runs)
                    if "_images" in r:
                        samples[label] = (r.pop("_images"), r.pop("_prompts"))
                    runs.append(r)
                    log(f"  {label:20s} {s.name:12s} lr={best:<7g} seed {seed}: fidelity {C._fmt(r['subject_fidelity'])} "
                        f"sim {r['similarity']:.3f} bg {r['background']:.2f} prior {C._fmt(r['prior'])} "
                        f"80% at {r['steps_to_80']}")
            result["optimizers"][label] = {
                "kwargs": cfg.kwargs, "lr_grid": list(grid), "best_lr": best,
                "sweep": {str(lr): [{k: r[k] for k in ("subject", "subject_fidelity", "similarity", "background", "prior")}
                                    for r in rows] for lr, rows in sweep.items()},
                "summary": summarize(runs, base_prior), "runs": runs}
        add_paired(result)
        result["wall_s"] = time.perf_counter() - t_start
        report(result, log, img_dir, samples)
        return result
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _setup(prof: dict) -> dict:
    from adaprelora.tiny_t2i.personalise import DREAMBOOTH_DEFAULTS

    # This suite trains without prior preservation (it would double the step cost): say so in the record.
    defaults = {k: v for k, v in DREAMBOOTH_DEFAULTS.items()
                if k not in ("class_prompt", "num_class_images", "class_caption_dropout_rate")}
    return {**defaults, "with_prior_preservation": False, "max_train_steps": prof["steps"], "lr_warmup_steps": 0,
            "images_per_subject": 5,
            "guidance_scale": GUIDANCE, "num_inference_steps": prof["num_inference_steps"],
            "trigger_prompt": "a sks shape on a {background} background",
            "profile": {k: (list(v) if isinstance(v, tuple) else v) for k, v in prof.items()}}


def add_paired(result: dict) -> None:
    """Each optimizer's scores minus AdamW's on the same subject and seed (so the same images and
    data order), with bootstrap 95% intervals over those pairs."""
    runs = {label: o["runs"] for label, o in result["optimizers"].items()}
    paired = stats.paired_vs_baseline(runs, "adamw", {"subject_fidelity": False, "similarity": False, "prior": False},
                                      unit=lambda r: (r["subject"], r["seed"]))
    for label, p in paired.items():
        result["optimizers"][label]["paired_vs_adamw"] = p


TABLE_HEADERS = ["optimizer", "lr", "subject fidelity", "std", "similarity", "background", "prior kept",
                 "reached 80%", "steps to 80% (median)", "s / step", "state bytes", "fidelity - adamw [95%]",
                 "prior - adamw [95%]"]


def table_rows(result: dict) -> list:
    rows = []
    for label, o in result["optimizers"].items():
        s = o["summary"]

        def mean(key):
            return s[key]["mean"] if s.get(key) else None

        rows.append([label, o["best_lr"], mean("subject_fidelity"), s["subject_fidelity"]["std"] if s["subject_fidelity"] else None,
                     mean("similarity"), mean("background"), mean("prior_kept"), f"{s['reached_80']}/{s['runs']}",
                     s["steps_to_80_median"], s["s_per_step_median"], s["state_bytes"],
                     stats.interval_text((o.get("paired_vs_adamw") or {}).get("subject_fidelity")),
                     stats.interval_text((o.get("paired_vs_adamw") or {}).get("prior"))])
    return rows


def report(result: dict, log=print, img_dir=None, samples: Optional[dict] = None) -> None:
    prof = result["setup"]["profile"]
    log(f"\n== dreambooth (tiny-sd, {prof['steps']} steps, confirm on {', '.join(result['confirm_subjects'])}, "
        f"seeds {prof['seeds']}) ==")
    log(C.format_table(TABLE_HEADERS, table_rows(result)))
    if result["profile"] == "smoke":
        return
    img_dir = img_dir or C.IMG_DIR
    series, bands = {}, {}
    for label, o in result["optimizers"].items():
        runs = [r for r in o["runs"] if all(f is not None for f in r["curve_fidelity"])]
        if not runs:
            continue
        x = runs[0]["curve_steps"]
        ys = np.array([r["curve_fidelity"] for r in runs if len(r["curve_fidelity"]) == len(x)])
        key = f"{label} (lr {o['best_lr']:g})"
        series[key] = (x, ys.mean(0))
        bands[key] = (x, ys.min(0), ys.max(0))
    plots = []
    if series:
        plots.append(C.plot_curves(os.path.join(img_dir, "quality_dreambooth_fidelity.png"), series, bands=bands,
                                   title="DreamBooth on tiny-sd: subject fidelity (judge) vs step, confirmation runs",
                                   xlabel="step", ylabel="fraction of trigger-prompt images showing the subject"))
    if samples:
        from adaprelora.tiny_t2i.quality import grid

        os.makedirs(img_dir, exist_ok=True)
        for label, (images, prompts) in samples.items():
            path = os.path.join(img_dir, f"quality_dreambooth_samples_{label.replace('@', '_')}.png")
            short = [p.replace("a sks shape on a ", "").replace(" background", " bg") for p in prompts]
            grid(images, short, columns=min(7, len(images))).save(path)
            plots.append(path)
    result["plots"] = plots
