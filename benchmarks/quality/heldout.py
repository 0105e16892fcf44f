"""DreamBooth on the built-in model scored by held-out denoising loss: a measure precise enough to
tell optimizers apart where the judge's image counts cannot.

Why: the judge's subject fidelity over a few dozen generated images moves by ~0.2 from seed to
seed, which hides any difference between optimizers smaller than that. The denoising loss on
held-out images at fixed timesteps and fixed noise (`ValidationLossSet`) is deterministic for the
same weights and varies by under 2% between training seeds, so a paired comparison over a handful of
(subject, seed) units resolves gaps of a few percent.

Every run trains with the app's defaults for the built-in model (`DREAMBOOTH_DEFAULTS`: 400 steps,
batch 8, rank 16, text encoder, prior preservation on the 64 captioned class scenes the app writes,
class caption dropout 0.2, min-SNR-5) through the trainer's own code path
(`adaprelora.training.dreambooth.train`), changing only the optimizer and its lr. Two scores:

- subject loss: on `HELDOUT_SUBJECT_IMAGES` renders of the subject (its colour, at positions, sizes
  and background pairings drawn from another seed than its 5 training images), captioned with the
  trigger prompt; lower = the subject is learnt, not only its 5 pictures;
- prior loss: on `HELDOUT_PRIOR_IMAGES` ordinary captioned scenes drawn from another seed than the
  class images (none of them trained on); compare with the base model's: higher = drift.

The trainer evaluates the subject set every 100 steps (`--validation_loss_data_dir`, the curve in
`validation_loss.jsonl`, with its drift on the trained class images); both final scores are then
computed from the saved LoRA loaded into the pipeline (`load_lora_weights`), one `ValidationLossSet`
per set, so the held-out prior set never enters training. The trainer's last subject value and the
reloaded one are both recorded (they agree to float precision: a check of the export).

Protocol: `--stage tune` sweeps each optimizer's lr on a 2x log grid on the tuning subject (heart),
extending the grid at an end until the best lr (mean subject loss over the tuning seeds) is
interior; `--stage confirm` runs each at its tuned lr on the other subjects and seeds, and the
table gives each optimizer's paired difference to AdamW (same subject, seed, so the same LoRA
initialisation and data order) with bootstrap 95% intervals. Runs accumulate in one JSON (file-
locked, so two processes can share it); a (config, lr, subject, seed) already there is skipped.

    python -m benchmarks.quality dreambooth-heldout --quick --stage tune --configs adamw,adaprelora,ema-root
    python -m benchmarks.quality dreambooth-heldout --quick --stage confirm --seeds 0,1,2
    python -m benchmarks.quality dreambooth-heldout --quick --report          # tables from the JSON only
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from typing import Callable, Optional

import numpy as np

from . import common as C
from . import stats

SUITE = "dreambooth_heldout"
HELDOUT_SUBJECT_IMAGES = 32
HELDOUT_PRIOR_IMAGES = 32
SUBJECT_IMAGES_SEED = 0  # the 5 training images (write_subject_images' default)
HELDOUT_SUBJECT_SEED = 1000  # positions, sizes and background order of the held-out renders
HELDOUT_PRIOR_SEED = 2026  # the held-out ordinary scenes (the app's class images use seed 7)
TUNE_SUBJECTS = ("heart",)
CONFIRM_SUBJECTS = ("crescent", "striped ring", "arrow")

PROFILES = {
    "smoke": dict(steps=2, batch=1, num_class_images=2, subject_images=2, prior_images=2, validation_loss_steps=1,
                  tune_seeds=(0,), confirm_seeds=(0,)),
    "quick": dict(steps=None, batch=None, num_class_images=None, subject_images=HELDOUT_SUBJECT_IMAGES,
                  prior_images=HELDOUT_PRIOR_IMAGES, validation_loss_steps=100, tune_seeds=(0,),
                  confirm_seeds=(0, 1, 2)),
}
# The momentum-into-the-solve variant (the paper's reading: momentum fed to the closed form, the step
# keeping the Adafactor row/column scaling) with root-averaged energies (docs/algorithm.md, "Options").
EMA_ROOT = C.OptConfig("ema-root", "adaprelora-sgd",
                       {"stats": "exact", "momentum_before_solve": True, "energy_ema": "root"}, family="sgd")
EXTRA_CONFIGS = {EMA_ROOT.label: EMA_ROOT}
DEFAULT_CONFIGS = ("adamw", "adaprelora", "ema-root")
# Starting grids (2x apart) from the pilot: AdamW best near 1e-3..2e-3, the momentum variant still
# improving at 1e-4. `tune` extends a grid at whichever end holds the best lr.
TUNE_GRIDS = {"adamw": (5e-4, 1e-3, 2e-3, 4e-3), "adaprelora": (5e-4, 1e-3, 2e-3, 4e-3),
              "ema-root": (2.5e-5, 5e-5, 1e-4, 2e-4), "scaled-adamw": (5e-4, 1e-3, 2e-3, 4e-3),
              "prodigy": (0.5, 1.0, 2.0)}
MAX_GRID_POINTS = 9
NO_EXTEND = ("prodigy",)  # its documented lr is 1.0; 0.5 and 2.0 show how forgiving it is


def config_for(label: str) -> C.OptConfig:
    if label in EXTRA_CONFIGS:
        return EXTRA_CONFIGS[label]
    if label not in C.CONFIGS_BY_LABEL:
        raise SystemExit(f"error: unknown config {label!r}: use one of "
                         f"{', '.join(sorted([*EXTRA_CONFIGS, *C.CONFIGS_BY_LABEL]))}")
    return C.CONFIGS_BY_LABEL[label]


# -- the held-out sets ---------------------------------------------------------------------------
def heldout_subject_scenes(subject: str, count: int):
    """`count` renders of `subject` in its colour, drawn from `HELDOUT_SUBJECT_SEED` (so positions,
    sizes and background pairings differ from its training images)."""
    from adaprelora.tiny_t2i import scenes

    return scenes.subject_scenes(subject, count, seed=HELDOUT_SUBJECT_SEED)


def write_heldout_subject(subject: str, folder: str, count: int) -> str:
    """The held-out subject renders as PNGs with trigger-prompt captions (the trainer's
    `--validation_loss_data_dir` format)."""
    from adaprelora.tiny_t2i import scenes
    from adaprelora.tiny_t2i.personalise import trigger_prompt

    os.makedirs(folder, exist_ok=True)
    for i, scene in enumerate(heldout_subject_scenes(subject, count)):
        stem = os.path.join(folder, f"heldout_{i:03d}")
        scenes.render(scene).save(stem + ".png")
        with open(stem + ".txt", "w") as fh:
            fh.write(trigger_prompt(scene.background))
    return folder


def heldout_prior(count: int) -> tuple[list, list]:
    """(images, captions) of `count` ordinary scenes from `HELDOUT_PRIOR_SEED`."""
    from adaprelora.tiny_t2i import scenes

    drawn = list(scenes.scenes(HELDOUT_PRIOR_SEED, count))
    return [scenes.render(s) for s in drawn], [scenes.caption(s) for s in drawn]


class Scorer:
    """The base pipeline and the two held-out sets of each subject, built once per process;
    scores the base model or a LoRA folder."""

    def __init__(self, model_dir: str, prof: dict, work_dir: str):
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        from adaprelora.training.dreambooth.validation_loss import ValidationLossSet

        self.pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        self.prof, self.work_dir = prof, work_dir
        images, captions = heldout_prior(prof["prior_images"])
        self.prior_set = ValidationLossSet.from_images(images, captions, self.pipe.vae, self.scheduler, resolution=64)
        self.subject_sets: dict = {}

    def subject_dir(self, subject: str) -> str:
        return os.path.join(self.work_dir, "heldout", subject.replace(" ", "_"))

    def subject_set(self, subject: str):
        from adaprelora.training.dreambooth.validation_loss import ValidationLossSet

        if subject not in self.subject_sets:
            folder = write_heldout_subject(subject, self.subject_dir(subject), self.prof["subject_images"])
            self.subject_sets[subject] = ValidationLossSet.from_folder(folder, self.pipe.vae, self.scheduler,
                                                                       resolution=64)
        return self.subject_sets[subject]

    def score(self, subject: str, lora_dir: Optional[str]) -> dict:
        if lora_dir is not None:
            self.pipe.load_lora_weights(lora_dir)
        try:
            return {"subject_loss": self.subject_set(subject).evaluate(self.pipe),
                    "prior_loss": self.prior_set.evaluate(self.pipe)}
        finally:
            if lora_dir is not None:
                self.pipe.unload_lora_weights()


# -- one run -------------------------------------------------------------------------------------
def train_config(model_dir: str, subject: str, cfg: C.OptConfig, lr: float, seed: int, prof: dict, dirs: dict):
    from adaprelora.tiny_t2i.personalise import DREAMBOOTH_DEFAULTS, trigger_prompt
    from adaprelora.training.dreambooth import TrainConfig

    settings = dict(DREAMBOOTH_DEFAULTS)
    for key, name in (("steps", "max_train_steps"), ("batch", "train_batch_size"),
                      ("num_class_images", "num_class_images")):
        if prof[key] is not None:
            settings[name] = prof[key]
    settings["learning_rate"] = lr
    return TrainConfig(pretrained_model_name_or_path=model_dir, instance_data_dir=dirs["instance"],
                       instance_prompt=trigger_prompt("white"), output_dir=dirs["out"], lr_warmup_steps=0, seed=seed,
                       class_data_dir=dirs["class"], checkpointing_steps=10**6, report_to="none",
                       validation_prompt=None, skip_export_check=True, optimizer=cfg.name,
                       optimizer_args=dict(cfg.kwargs), validation_loss_data_dir=dirs["heldout"],
                       validation_loss_steps=prof["validation_loss_steps"], **settings)


def run_one(scorer: Scorer, model_dir: str, subject: str, cfg: C.OptConfig, lr: float, seed: int, stage: str,
            prof: dict, work_dir: str, extra_scores: Optional[Callable[[str], dict]] = None) -> dict:
    """Train one run and score the saved LoRA on both held-out sets; `extra_scores(lora_dir)` adds
    more scores of the same LoRA (the judge's, in `judge_check`) before its folder is removed."""
    from adaprelora.tiny_t2i.personalise import write_class_images, write_subject_images
    from adaprelora.training.dreambooth.validation_loss_log import read_validation_losses

    slug = subject.replace(" ", "_")
    dirs = {"instance": os.path.join(work_dir, "subjects", slug), "class": os.path.join(work_dir, "class"),
            "heldout": scorer.subject_dir(subject)}
    if not os.path.isdir(dirs["instance"]):
        write_subject_images(subject, dirs["instance"], count=5, seed=SUBJECT_IMAGES_SEED)
    if not os.path.isdir(dirs["class"]):
        from adaprelora.tiny_t2i.personalise import DREAMBOOTH_DEFAULTS

        write_class_images(dirs["class"], prof["num_class_images"] or DREAMBOOTH_DEFAULTS["num_class_images"])
    scorer.subject_set(subject)  # writes the held-out folder the trainer reads
    dirs["out"] = tempfile.mkdtemp(prefix="db-heldout-", dir=work_dir)
    try:
        t0 = time.perf_counter()
        losses, steps_per_sec, train_s = C.run_dreambooth(train_config(model_dir, subject, cfg, lr, seed, prof, dirs))
        curve = read_validation_losses(os.path.join(dirs["out"], "validation_loss.jsonl"))
        final = scorer.score(subject, dirs["out"])
        if extra_scores is not None:
            final.update(extra_scores(dirs["out"]))
        return {"stage": stage, "config": cfg.label, "lr": lr, "subject": subject, "seed": seed, **final,
                "trainer_subject_loss": curve[-1]["validation_loss"] if curve else None,
                "trainer_class_loss": curve[-1].get("prior_validation_loss") if curve else None,
                "curve": curve, "final_train_loss": float(np.mean(losses[-50:])) if losses else None,
                "train_s": train_s, "s_per_step": (1.0 / steps_per_sec) if steps_per_sec else None,
                "eval_s": time.perf_counter() - t0 - train_s}
    finally:
        shutil.rmtree(dirs["out"], ignore_errors=True)


# -- the shared results file ---------------------------------------------------------------------
def results_path(profile: str, tag: Optional[str], out_dir: Optional[str]) -> str:
    name = SUITE + (f"_{tag}" if tag else "")
    return os.path.join(out_dir or C.RESULTS_DIR, f"quality_{name}.json" if profile == "quick"
                        else f"quality_{name}_{profile}.json")


@contextlib.contextmanager
def locked(path: str):
    """An exclusive lock for read-modify-write of `path` by several benchmark processes."""
    key = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
    with open(os.path.join(tempfile.gettempdir(), f"adaprelora-{key}.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load(path: str) -> dict:
    if os.path.isfile(path):
        with open(path) as fh:
            return json.load(fh)
    return {"suite": "dreambooth-heldout", "runs": [], "base": {}}


def run_key(run: dict) -> tuple:
    return run["config"], float(run["lr"]), run["subject"], int(run["seed"])


def add_and_save(path: str, profile: str, out_dir: Optional[str], tag: Optional[str], run: Optional[dict] = None,
                 base: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
    """Merge one run (and base scores / header fields) into the JSON under the lock; the analysis is
    recomputed from all runs so the file is always complete."""
    with locked(path):
        result = load(path)
        if run is not None:
            result["runs"] = [r for r in result["runs"] if run_key(r) != run_key(run)] + [run]
        if base:
            result["base"].update(base)
        result.update(extra or {})
        result["analysis"] = analyse(result)
        C.write_json(result, SUITE + (f"_{tag}" if tag else ""), profile, out_dir)
    return result


def done_keys(path: str) -> set:
    with locked(path):
        return {run_key(r) for r in load(path)["runs"]}


# -- analysis ------------------------------------------------------------------------------------
def tuning_table(runs: list, config: str) -> dict:
    """{lr: {"subject_loss": mean, "prior_loss": mean, "n": runs}} over a config's tuning runs."""
    by_lr: dict = {}
    for r in runs:
        if r["stage"] == "tune" and r["config"] == config:
            by_lr.setdefault(float(r["lr"]), []).append(r)
    return {lr: {"subject_loss": float(np.mean([r["subject_loss"] for r in rows])),
                 "prior_loss": float(np.mean([r["prior_loss"] for r in rows])), "n": len(rows),
                 "seeds": sorted(r["seed"] for r in rows)}
            for lr, rows in sorted(by_lr.items())}


def tuned_lr(runs: list, config: str) -> Optional[dict]:
    """The tuning sweep's best lr by mean subject loss, whether it is interior, and the bands of lrs
    within 2% and within 10% (90%) of the best loss (`stats.lr_band`)."""
    table = tuning_table(runs, config)
    if not table:
        return None
    # Only lrs with every tuning seed count (a half-finished lr would be compared on fewer seeds).
    most = max(v["n"] for v in table.values())
    table = {lr: v for lr, v in table.items() if v["n"] == most}
    lrs = list(table)
    scores = [table[lr]["subject_loss"] for lr in lrs]
    band2 = stats.lr_band(lrs, scores, higher_is_better=False, within=0.98)
    band10 = stats.lr_band(lrs, scores, higher_is_better=False, within=0.9)
    return {"best_lr": band2["best_lr"], "interior": band2["interior"], "band_2pct": band2, "band_10pct": band10,
            "grid": lrs, "sweep": {str(lr): v for lr, v in table.items()}}


def next_lr(runs: list, config: str) -> Optional[float]:
    """The next grid point to run when the best lr is at an end of the grid (2x beyond it), else None."""
    t = tuned_lr(runs, config)
    if t is None or t["interior"] or len(t["grid"]) >= MAX_GRID_POINTS or config in NO_EXTEND:
        return None
    grid = t["grid"]
    return grid[0] / 2 if t["best_lr"] == grid[0] else grid[-1] * 2


def paired(runs: list, config: str, baseline: str = "adamw") -> dict:
    """Confirmation runs of `config` minus `baseline`'s on the same (subject, seed), each at its
    tuned lr: relative and absolute differences of both losses with bootstrap 95% intervals."""
    def scores(label, key):
        return {(r["subject"], r["seed"]): r[key] for r in runs if r["stage"] == "confirm" and r["config"] == label}

    out = {}
    for key in ("subject_loss", "prior_loss"):
        cand, base = scores(config, key), scores(baseline, key)
        out[key] = {"relative": stats.paired_interval(cand, base, relative=True),
                    "absolute": stats.paired_interval(cand, base)}
        diffs = list(stats.paired_differences(cand, base, relative=True).values())
        if len(diffs) >= 2:
            sd = float(np.std(diffs, ddof=1))
            # What the design resolves: a 95% interval's half-width, and the difference a two-sided
            # 5% test would detect 80% of the time (z 1.96 + 0.84), both from the measured spread.
            out[key]["paired_sd_relative"] = sd
            out[key]["half_width_95_relative"] = 1.96 * sd / math.sqrt(len(diffs))
            out[key]["detectable_80pct_power_relative"] = 2.8 * sd / math.sqrt(len(diffs))
    return out


def confirm_summary(runs: list, config: str) -> Optional[dict]:
    rows = [r for r in runs if r["stage"] == "confirm" and r["config"] == config]
    if not rows:
        return None
    spreads = []
    for subject in sorted({r["subject"] for r in rows}):
        vals = [r["subject_loss"] for r in rows if r["subject"] == subject]
        if len(vals) >= 2:
            spreads.append(float(np.std(vals, ddof=1) / np.mean(vals)))
    return {"lr": sorted({float(r["lr"]) for r in rows}), "runs": len(rows),
            "subject_loss": C.mean_spread([r["subject_loss"] for r in rows]),
            "prior_loss": C.mean_spread([r["prior_loss"] for r in rows]),
            "seed_spread_relative": float(np.mean(spreads)) if spreads else None,
            "s_per_step_median": float(np.median([r["s_per_step"] for r in rows if r.get("s_per_step")] or [np.nan]))}


def analyse(result: dict) -> dict:
    runs = result["runs"]
    configs = list(dict.fromkeys(r["config"] for r in runs))
    return {"tuning": {c: tuned_lr(runs, c) for c in configs if tuned_lr(runs, c)},
            "confirm": {c: confirm_summary(runs, c) for c in configs if confirm_summary(runs, c)},
            "paired_vs_adamw": {c: paired(runs, c) for c in configs if c != "adamw"}}


# -- tables --------------------------------------------------------------------------------------
def _f(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def report(result: dict, log=print) -> None:
    a = result.get("analysis") or analyse(result)
    base = result.get("base", {})
    if base:
        log("\nbase model: " + "; ".join(f"{s}: subject {_f(b['subject_loss'])}, prior {_f(b['prior_loss'])}"
                                         for s, b in base.items()))
    if a["tuning"]:
        log("\n| optimizer | lr: subject loss (prior loss) on the tuning subject | best lr | interior | "
            "band within 2% | band within 10% |")
        log("|---|---|---|---|---|---|")
        for c, t in a["tuning"].items():
            cells = ", ".join(f"{float(lr):g}: {v['subject_loss']:.4f} ({v['prior_loss']:.4f})"
                              for lr, v in t["sweep"].items())
            b2, b10 = t["band_2pct"], t["band_10pct"]
            log(f"| {c} | {cells} | {t['best_lr']:g} | {'yes' if t['interior'] else 'no'} | "
                f"{b2['band_lo']:g}-{b2['band_hi']:g} ({b2['band_width_log2']:.0f} oct) | "
                f"{b10['band_lo']:g}-{b10['band_hi']:g} ({b10['band_width_log2']:.0f} oct) |")
    if a["confirm"]:
        log("\n| optimizer | lr | runs | subject loss | seed spread | prior loss | subject vs AdamW [95%] | "
            "(absolute) | prior vs AdamW [95%] |")
        log("|---|---|---|---|---|---|---|---|---|")
        for c, s in a["confirm"].items():
            p = a["paired_vs_adamw"].get(c) or {}
            sub, pri = p.get("subject_loss") or {}, p.get("prior_loss") or {}
            lrs = ", ".join(f"{lr:g}" for lr in s["lr"])
            spread = "-" if s["seed_spread_relative"] is None else f"{100 * s['seed_spread_relative']:.1f}%"
            log(f"| {c} | {lrs} | {s['runs']} | "
                f"{s['subject_loss']['mean']:.4f} +- {s['subject_loss']['std']:.4f} | {spread} | "
                f"{s['prior_loss']['mean']:.4f} | {stats.interval_text(sub.get('relative'))} | "
                f"{stats.interval_text(sub.get('absolute'), 4)} | {stats.interval_text(pri.get('relative'))} |")


def plot_lr(result: dict, img_dir: Optional[str] = None) -> Optional[str]:
    """Held-out subject loss against lr on the tuning subject, one line per optimizer (log2 axis):
    where each optimizer's best lr lies and how flat the loss is around it."""
    series = {c: ([float(lr) for lr in t["sweep"]], [v["subject_loss"] for v in t["sweep"].values()])
              for c, t in (result.get("analysis") or analyse(result))["tuning"].items()}
    if not series:
        return None
    return C.plot_curves(os.path.join(img_dir or C.IMG_DIR, "quality_dreambooth_heldout_lr.png"), series,
                         title="DreamBooth at the app's defaults: held-out subject loss against lr (heart, seed 0)",
                         xlabel="learning rate (log2 axis)", ylabel="held-out subject loss (lower is better)",
                         logx=True)


# -- the command ---------------------------------------------------------------------------------
def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _floats(text: Optional[str]) -> Optional[list]:
    return [float(x) for x in text.split(",")] if text else None


def main(args, log=print) -> int:
    """The `dreambooth-heldout` suite of `python -m benchmarks.quality` (args: its parsed flags)."""
    from adaprelora.tiny_t2i import TINY_SD_DIR, scenes

    profile = args.profile or "quick"
    prof = PROFILES[profile]
    path = results_path(profile, args.tag, args.out_dir)
    if args.report:
        report(load(path), log)
        log(f"plot: {plot_lr(load(path), getattr(args, 'img_dir', None))}")
        return 0
    model_dir = args.model or TINY_SD_DIR
    stage = args.stage
    configs = args.configs.split(",") if args.configs else list(DEFAULT_CONFIGS)
    cfgs = [config_for(c) for c in configs]
    subjects = ([s.replace("_", " ") for s in args.subjects.split(",")] if args.subjects  # striped_ring too
                else list(TUNE_SUBJECTS if stage == "tune" else CONFIRM_SUBJECTS))
    bad = [s for s in subjects if s not in scenes.SUBJECTS]
    if bad:
        raise SystemExit(f"error: --subjects: unknown subject {bad[0]!r}: use some of {', '.join(scenes.SUBJECTS)}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(
        prof["tune_seeds" if stage == "tune" else "confirm_seeds"])
    lrs = _floats(args.lrs)
    header = {"machine": {**C.machine_info(), "machine": "2-core x86_64 CPU, shared"}, "commit": _git_commit(),
              "model": os.path.relpath(model_dir), "profile": profile,
              "setup": {**_setup(prof), "tune_subjects": list(TUNE_SUBJECTS), "confirm_subjects": list(CONFIRM_SUBJECTS)}}
    work_dir = tempfile.mkdtemp(prefix="quality-db-heldout-")
    t_start = time.perf_counter()
    try:
        scorer = Scorer(model_dir, prof, work_dir)
        base = {s: scorer.score(s, None) for s in subjects}
        result = add_and_save(path, profile, args.out_dir, args.tag, base=base, extra=header)

        def one(cfg, lr, subject, seed):
            if (cfg.label, float(lr), subject, seed) in done_keys(path):
                return
            r = run_one(scorer, model_dir, subject, cfg, lr, seed, stage, prof, work_dir)
            add_and_save(path, profile, args.out_dir, args.tag, run=r)
            log(f"  {stage} {cfg.label:14s} lr={lr:<8g} {subject:12s} seed {seed}: subject {r['subject_loss']:.5f} "
                f"(trainer {_f(r['trainer_subject_loss'], 5)}) prior {r['prior_loss']:.5f} "
                f"train {r['train_s']:.0f} s + eval {r['eval_s']:.0f} s")

        for cfg in cfgs:
            if stage == "tune":
                for lr in (lrs or TUNE_GRIDS.get(cfg.label) or (1e-3,)):
                    for subject in subjects:
                        for seed in seeds:
                            one(cfg, lr, subject, seed)
                while not args.no_extend:  # extend the grid until its best lr is interior
                    with locked(path):
                        runs = [r for r in load(path)["runs"] if r["subject"] in subjects and r["seed"] in seeds]
                    lr = next_lr(runs, cfg.label)
                    if lr is None:
                        break
                    log(f"  {cfg.label}: best lr at the grid's end, extending to {lr:g}")
                    for subject in subjects:
                        for seed in seeds:
                            one(cfg, lr, subject, seed)
            else:
                with locked(path):
                    t = tuned_lr(load(path)["runs"], cfg.label)
                if lrs:
                    lr = lrs[configs.index(cfg.label)] if len(lrs) == len(configs) else lrs[0]
                elif t is not None:
                    lr = t["best_lr"]
                else:
                    raise SystemExit(f"error: {cfg.label} has no tuning runs in {path}: run --stage tune first "
                                     "or give its lr with --lrs")
                for seed in seeds:
                    for subject in subjects:
                        one(cfg, lr, subject, seed)
        result = add_and_save(path, profile, args.out_dir, args.tag,
                              extra={"last_command": "python -m benchmarks.quality " + " ".join(args.argv)})
        report(result, log)
        log(f"[dreambooth-heldout] wrote {path} ({time.perf_counter() - t_start:.0f} s)")
        return 0
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _setup(prof: dict) -> dict:
    from adaprelora.tiny_t2i.personalise import DREAMBOOTH_DEFAULTS

    d = dict(DREAMBOOTH_DEFAULTS)
    for key, name in (("steps", "max_train_steps"), ("batch", "train_batch_size"),
                      ("num_class_images", "num_class_images")):
        if prof[key] is not None:
            d[name] = prof[key]
    return {**d, "heldout_subject_images": prof["subject_images"], "heldout_prior_images": prof["prior_images"],
            "heldout_subject_seed": HELDOUT_SUBJECT_SEED, "heldout_prior_seed": HELDOUT_PRIOR_SEED,
            "validation_timesteps": [125, 375, 625, 875], "validation_loss_steps": prof["validation_loss_steps"],
            "lr_selection": "tuning subject(s), mean held-out subject loss over the tuning seeds; grid 2x, "
                            "extended until the best lr is interior"}
