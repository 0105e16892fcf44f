"""`python -m benchmarks.quality dreambooth-others`: the judged DreamBooth comparison at the app's
defaults (the confirmation of `dreambooth --full`) for the optimizers users pick besides AdamW:
Prodigy, Scaled AdamW (the paper's main comparator) and Adafactor.

Why a separate stage: the confirmation compares AdamW and AdaPreLoRA at the app's lr, which was chosen
for them; another optimizer needs its own lr, and the held-out loss cannot pick one (it prefers lrs at
which the judge finds no subject), so each is tuned by the judge itself:

* **Tuning** on heart, seed 0 (`TUNE_SUBJECT`, `TUNE_SEED`): every optimizer, AdamW and AdaPreLoRA
  included (which tests the app's lr for them), on a 2x grid around the app's lr, picked by subject
  fidelity (ties: similarity), the grid extended while the best sits at an end. Prodigy runs at its
  documented lr 1.0 and its grid 0.5 / 1 / 2 shows how forgiving it is (never extended).
* **Confirmation** on the other subjects x seeds 0-4, each at its tuned lr, paired with the AdamW
  and AdaPreLoRA runs at the app's lr on the same (subject, seed): same LoRA initialisation, data
  order and noise. Those runs are the ones `dreambooth --full` made (kept from its JSON; each run is
  deterministic), so only the new optimizers train.

Runs go out to `--workers` worker processes (`dreambooth_quick`'s), in rounds: the tuning runs first,
then the extensions their results ask for, then the confirmation runs (seed by seed, so a stopped run
leaves balanced pairs; `--resume` runs only what is missing). The JSON is rewritten after every run.

    python -m benchmarks.quality dreambooth-others --resume        # about 58 runs, ~1.8 h on 2 cores
    python -m benchmarks.quality dreambooth-others --report        # the tables of the JSON only
    python -m benchmarks.quality dreambooth-others --smoke         # Prodigy against AdamW, a few steps per run (CI)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np

from . import common as C
from . import dreambooth_quick as Q
from . import heldout as H
from . import stats

SUITE = "dreambooth_others"
TUNE_SUBJECT, TUNE_SEED = "heart", 0
BASELINES = ("adamw", "adaprelora")  # at the app's lr, as in the confirmation
DEFAULT_CONFIGS = ("prodigy", "scaled-adamw", "adafactor")
FIXED_LR = {name: lrs[0] for name, lrs in C.FIXED_LRS.items()}  # documented lrs: confirmed there whatever the sweep shows
GRID_FACTORS = (0.5, 1.0, 2.0)  # x the app's lr (x 1.0 for a fixed-lr optimizer)
MAX_GRID_POINTS = 6
METRICS = (("subject_fidelity", False), ("subject_loss", True), ("prior_loss", True), ("prior", False))

PROFILES = {
    # dreambooth_quick's smoke runs (2 steps, few judged images); one new optimizer, no extension.
    "smoke": dict(runs="smoke", configs=("prodigy",), baselines=("adamw",), grid=(1.0,), extend=False,
                  confirm_subjects=("crescent",), confirm_seeds=(0,)),
    # the confirmation's runs (`dreambooth --full`: the quick held-out profile, the full judge).
    "quick": dict(runs="full", configs=DEFAULT_CONFIGS, baselines=BASELINES, grid=GRID_FACTORS, extend=True,
                  confirm_subjects=H.CONFIRM_SUBJECTS, confirm_seeds=(0, 1, 2, 3, 4)),
}


def _key(run: dict) -> tuple:
    """What the tuning maximises: subject fidelity, then similarity to the subject's images."""
    return (run["subject_fidelity"], run.get("similarity") or 0.0)


def tuning(runs: list, config: str, app_lr: float, prof: dict) -> dict:
    """The state of one optimizer's lr sweep on the tuning subject: {"grid": lrs to run, "scores":
    {lr: key} of the finished ones, "best_lr", "interior", "settled" (no more points to run), "lr":
    the lr it is confirmed at (None until settled)}."""
    centre = FIXED_LR.get(config, app_lr)
    grid = [centre * f for f in prof["grid"]]
    done = {float(r["lr"]): _key(r) for r in runs if (r["part"], r["config"], r["subject"], r["seed"])
            == ("a", config, TUNE_SUBJECT, TUNE_SEED) and r.get("subject_fidelity") is not None}
    grid = sorted(set(grid) | set(done))
    out = {"grid": grid, "scores": done, "best_lr": None, "interior": None, "settled": False,
           "lr": FIXED_LR.get(config)}
    if any(lr not in done for lr in grid):
        return out
    out["best_lr"] = C.best_grid_point(done)
    out["interior"] = C.next_grid_point(done) is None
    extend = prof["extend"] and config not in FIXED_LR and len(grid) < MAX_GRID_POINTS
    nxt = C.next_grid_point(done) if extend else None
    if nxt is not None:
        out["grid"] = sorted(grid + [nxt])
        return out
    out["settled"] = True
    out["lr"] = FIXED_LR.get(config, out["best_lr"])
    return out


def plan(runs: list, prof: dict, app_lr: float, workers: int) -> tuple:
    """(the next round's jobs, {config: tuning state}). A round holds every tuning run still missing
    (topped up with confirmation runs so no worker idles); once no tuning run is missing, every
    confirmation run: the baselines at the app's lr, each new optimizer at its settled lr."""
    configs = list(prof["baselines"]) + list(prof["configs"])
    states = {c: tuning(runs, c, app_lr, prof) for c in configs}
    have = {Q.job_key(r) for r in runs}

    def job(config, lr, subject, seed):
        return {"part": "a", "config": config, "lr": float(lr), "subject": subject, "seed": seed}

    tune = [job(c, lr, TUNE_SUBJECT, TUNE_SEED) for c in configs for lr in states[c]["grid"]]
    confirm = []
    for seed in prof["confirm_seeds"]:
        for subject in prof["confirm_subjects"]:
            for c in configs:
                lr = app_lr if c in prof["baselines"] else states[c]["lr"]
                if lr is not None:
                    confirm.append(job(c, lr, subject, seed))
    tune = [j for j in tune if Q.job_key(j) not in have]
    confirm = [j for j in confirm if Q.job_key(j) not in have]
    if tune:
        confirm = confirm[:(-len(tune)) % workers]
    return tune + confirm, states


# -- the comparisons -----------------------------------------------------------------------------
def pairs_table(runs: list, prof: dict, states: dict, app_lr: float) -> list:
    """Per optimizer on the confirmation subjects: its lr, pairs, mean of each metric and the paired
    difference to AdamW at the app's lr with a bootstrap 95% interval."""
    def at(config, lr):
        return {(r["subject"], r["seed"]): r for r in runs if r["part"] == "a" and r["config"] == config
                and float(r["lr"]) == float(lr) and r["subject"] in prof["confirm_subjects"]
                and r["seed"] in prof["confirm_seeds"]}

    base = at("adamw", app_lr)
    rows = []
    for c in list(prof["baselines"]) + list(prof["configs"]):
        lr = app_lr if c in prof["baselines"] else states[c]["lr"]
        if lr is None:
            continue
        mine = at(c, lr)
        units = sorted(set(mine) & set(base))
        row = {"config": c, "lr": lr, "pairs": len(units)}
        for metric, relative in METRICS:
            row[metric] = float(np.mean([mine[u][metric] for u in units])) if units else None
            if c != "adamw":
                cand = {u: mine[u][metric] for u in units}
                ref = {u: base[u][metric] for u in units}
                row[f"{metric}_vs_adamw"] = stats.paired_interval(cand, ref, relative=relative)
                diffs = stats.paired_differences(cand, ref, relative=relative).values()
                row[f"{metric}_higher"] = int(sum(d > 0 for d in diffs))
                row[f"{metric}_lower"] = int(sum(d < 0 for d in diffs))
        rows.append(row)
    return rows


def tuning_rows(states: dict, prof: dict, app_lr: float) -> list:
    """Per optimizer: the sweep (fidelity per lr), best lr, interior, the band within 90% of the best,
    and the lr it is confirmed at (the baselines: the app's)."""
    rows = []
    for c, st in states.items():
        scores = st["scores"]
        band = stats.lr_band(list(scores), [max(s[0], 1e-9) for s in scores.values()]) if scores else None
        rows.append({"config": c, "sweep": [[lr, scores[lr][0]] for lr in sorted(scores)], "best_lr": st["best_lr"],
                     "interior": st["interior"], "band": band,
                     "confirmed_at": app_lr if c in prof["baselines"] else st["lr"]})
    return rows


TUNING_HEADERS = ["optimizer", "subject fidelity per lr (heart, seed 0)", "best lr", "interior", "band within 90%",
                  "confirmed at"]
CONFIRM_HEADERS = ["optimizer", "lr", "pairs", "fidelity", "vs AdamW [95%] (pairs higher / lower)", "subject loss",
                   "vs AdamW", "prior loss", "vs AdamW", "prior (all three)", "vs AdamW"]


def tuning_table(result: dict) -> list:
    """The rows of the tuning table (`TUNING_HEADERS`)."""
    rows = []
    for t in result["tuning"]:
        band = t["band"]
        rows.append([t["config"], ", ".join(f"{lr:g}: {f:.3f}" for lr, f in _pairs(t["sweep"])),
                     "-" if t["best_lr"] is None else f"{t['best_lr']:g}", {True: "yes", False: "no"}.get(t["interior"], "-"),
                     f"{band['band_lo']:g}-{band['band_hi']:g} ({band['band_width_log2']:.0f} oct)" if band else "-",
                     "-" if t["confirmed_at"] is None else f"{t['confirmed_at']:g}"])
    return rows


def confirmation_table(result: dict) -> list:
    """The rows of the confirmation table (`CONFIRM_HEADERS`): means over the pairs, paired differences."""
    rows = []
    for r in result["confirmation"]:
        cells = [r["config"], f"{r['lr']:g}", r["pairs"]]
        for metric, relative in METRICS:
            value = r[metric]
            cells.append("-" if value is None else f"{value:.3f}" if not relative else f"{value:.4f}")
            iv = r.get(f"{metric}_vs_adamw")
            cells.append("-" if r["config"] == "adamw" or iv is None else
                         f"{stats.interval_text(iv, None if relative else 3)} ({r[f'{metric}_higher']} / "
                         f"{r[f'{metric}_lower']})")
        rows.append(cells)
    return rows


def report(result: dict, log=print) -> None:
    log("\n== tuning on heart, seed 0: subject fidelity per lr (the judge's, 21 trigger-prompt images) ==")
    log(C.format_table(TUNING_HEADERS, tuning_table(result)))
    log(f"\n== confirmation on {', '.join(result['setup']['confirm_subjects'])} x seeds "
        f"{result['setup']['confirm_seeds']}: paired with AdamW at {result['app_lr']:g}, bootstrap 95% ==")
    log(C.format_table(CONFIRM_HEADERS, confirmation_table(result)))
    if result.get("missing_runs"):
        log(f"incomplete: {result['missing_runs']} run(s) missing; `--resume` runs them")


def _pairs(sweep) -> list:
    """A sweep's [lr, fidelity] pairs (files written before it was a list hold {"lr": fidelity})."""
    return sorted(((float(lr), f) for lr, f in (sweep.items() if isinstance(sweep, dict) else sweep)))


# -- the command ---------------------------------------------------------------------------------
def main(args, log=print) -> int:
    """The `dreambooth-others` suite of `python -m benchmarks.quality` (args: its parsed flags)."""
    from adaprelora.tiny_t2i.personalise import DREAMBOOTH_DEFAULTS

    t_start = time.perf_counter()
    profile = args.profile or "quick"
    if profile not in PROFILES:
        return Q._usage_error(f"--{profile}: dreambooth-others has the profiles {', '.join(PROFILES)}")
    prof = dict(PROFILES[profile])
    if args.configs:
        unknown = [c for c in args.configs.split(",") if c not in C.CONFIGS_BY_LABEL and c not in H.EXTRA_CONFIGS]
        if unknown:
            return Q._usage_error(f"--configs: unknown optimizer {unknown[0]!r}; e.g. {','.join(DEFAULT_CONFIGS)}")
        prof["configs"] = tuple(c for c in args.configs.split(",") if c not in prof["baselines"])
    if args.workers < 1:
        return Q._usage_error(f"--workers {args.workers}: give at least 1")
    name = SUITE + (f"_{args.tag}" if args.tag else "")
    path = C.result_path(SUITE, profile, args.out_dir, args.tag)
    app_lr = float(DREAMBOOTH_DEFAULTS["learning_rate"])
    if args.report:
        if not os.path.isfile(path):
            return Q._usage_error(f"--report: no results in {path}: run `python -m benchmarks.quality "
                                  "dreambooth-others` first")
        with open(path) as fh:
            report(json.load(fh), log)
        return 0
    # The confirmation's runs (same training and judge) are kept, and with --resume this suite's own.
    confirmation = C.result_path(Q.SUITE, prof["runs"], args.out_dir)
    sources = ([path] if getattr(args, "resume", False) else []) + [confirmation]
    earlier = _load_runs(sources, prof)
    kept = {Q.job_key(r) for r in _load_runs([confirmation], prof)}  # not this suite's own runs
    parts = _parts(path) if getattr(args, "resume", False) else []
    header = {"suite": "dreambooth-others", "profile": profile, "commit": H._git_commit(),
              "machine": {**C.machine_info(), "machine": "2-core x86_64 CPU, shared"},
              "model": os.path.relpath(args.model) if args.model else "assets/tiny-sd", "app_lr": app_lr,
              "setup": {**H._setup(H.PROFILES[Q.PROFILES[prof["runs"]]["heldout"]]),
                        "judge": {**Q.judge_check.JUDGE, **Q.PROFILES[prof["runs"]]["judge"]},
                        "tune": {"subject": TUNE_SUBJECT, "seed": TUNE_SEED, "grid_factors": list(prof["grid"]),
                                 "fixed_lr": FIXED_LR, "max_grid_points": MAX_GRID_POINTS},
                        "confirm_subjects": list(prof["confirm_subjects"]),
                        "confirm_seeds": list(prof["confirm_seeds"])},
              "configs": list(prof["configs"]), "baselines": list(prof["baselines"]),
              "kept_from": [os.path.relpath(p, Q.REPO) for p in sources if os.path.isfile(p)],
              "workers": args.workers, "threads": args.threads,
              "command": "python -m benchmarks.quality " + " ".join(getattr(args, "argv", []) or ["dreambooth-others"])}
    runs, failed, rounds = list(earlier), [], 0

    def write(extra_rows=()) -> dict:
        all_runs = runs + [r for r in extra_rows if "base" not in r]
        jobs, states = plan(all_runs, prof, app_lr, args.workers)
        own = [r for r in all_runs if Q.job_key(r) not in kept]
        wall = time.perf_counter() - t_start
        result = {**header, "runs": all_runs, "missing_runs": len(jobs), "tuning": tuning_rows(states, prof, app_lr),
                  "confirmation": pairs_table(all_runs, prof, states, app_lr), "failed_workers": failed,
                  "wall_s": wall, "own_runs": len(own), "own_run_s_sum": float(sum(r["seconds"] for r in own)),
                  "parts": parts + [{"command": header["command"], "commit": header["commit"], "wall_s": wall,
                                     "rounds": rounds}]}
        C.write_json(result, name, profile, args.out_dir)
        return result

    while True:
        jobs, _ = plan(runs, prof, app_lr, args.workers)
        if not jobs or failed:
            break
        rounds += 1
        workers = max(1, min(args.workers, len(jobs)))
        log(f"dreambooth-others ({profile}) round {rounds}: {len(jobs)} runs on {workers} workers ("
            f"{len(runs)} kept or done)")
        work_dir = tempfile.mkdtemp(prefix="quality-db-others-")
        try:
            rows, _, _, bad = Q.launch(Q.deal(jobs, workers), prof["runs"], args.model, args.threads, work_dir, log,
                                       on_rows=write)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        new = [r for r in rows if "base" not in r]
        runs += new
        failed += bad
        if not new:
            failed.append("no run finished in this round")
    result = write()
    report(result, log)
    log(f"[dreambooth-others] wrote {path} ({result['wall_s']:.0f} s, {rounds} round(s))")
    if failed or result["missing_runs"]:
        log(f"error: {result['missing_runs']} run(s) did not finish (workers: {', '.join(failed) or 'stopped'}); "
            "the tables cover the finished ones; `--resume` runs only the missing ones")
        return 1
    return 0


def _parts(path: str) -> list:
    """The commands that made the results file at `path` so far, with their wall times."""
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        earlier = json.load(fh)
    return earlier.get("parts") or [{k: earlier.get(k) for k in ("command", "commit", "wall_s")}]


def _load_runs(paths: list, prof: dict) -> list:
    """The judged runs (part "a") of the results files `paths` that this profile would make, first
    file first, one per (config, lr, subject, seed)."""
    subjects = set(prof["confirm_subjects"]) | {TUNE_SUBJECT}
    seen, out = set(), []
    for path in dict.fromkeys(paths):
        if not os.path.isfile(path):
            continue
        with open(path) as fh:
            for r in json.load(fh)["runs"]:
                if r.get("part") == "a" and r["subject"] in subjects and Q.job_key(r) not in seen:
                    seen.add(Q.job_key(r))
                    out.append(r)
    return out

