"""`python -m benchmarks.quality dreambooth --quick`: the DreamBooth headline of `docs/results.md`,
reproduced small enough to run in under 45 minutes on a 2-core CPU.

The headline rests on two comparisons of AdaPreLoRA with AdamW on the built-in model at the app's
DreamBooth defaults (prior preservation, class caption dropout, text encoder, min-SNR; 400 steps):
(a) both at the app's lr, judged on generated images and scored by the held-out subject and prior
losses (`judge_check`), and (b) each at the lr that minimised its held-out subject loss in the tuning
stage of `dreambooth-heldout` (read from its committed JSON), on other subjects. This runs a few
(subject, seed) pairs of each through the same code (`judge_check.run`, `heldout.run_one`), prints
each comparison's paired difference to AdamW with a bootstrap 95% interval, and says for each
whether its direction matches the headline's.

Two worker processes (one torch thread each) share the runs; each run is independent, so the
numbers do not depend on which worker ran it. Every worker has a time limit.

    python -m benchmarks.quality dreambooth --quick     # 6 + 6 runs, writes quality_dreambooth_quick.json
    python -m benchmarks.quality dreambooth --full --resume   # (a) on 4 subjects x 5 seeds: 40 + 6 runs,
                                                              # the quick profile's 12 kept (about 70 min)
    python -m benchmarks.quality dreambooth --smoke     # a few steps per run (CI)
    python -m benchmarks.quality dreambooth --quick --resume   # after a stop: only the missing runs
    python -m benchmarks.quality dreambooth --quick --report   # the table of the JSON only
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from adaprelora.tiny_t2i.scenes import SUBJECTS

from . import common as C
from . import heldout as H
from . import judge_check, stats

SUITE = "dreambooth_quick"
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# The tuning stage whose best lrs part (b) uses (committed; `dreambooth-heldout --stage tune`).
TUNE_JSON = os.path.join(REPO, "benchmarks", "results", "quality_dreambooth_heldout.json")
# Its best lrs as of 2026-12-07, used only when that file or a config's sweep is missing.
TUNED_LR_FALLBACK = {"adamw": 2.5e-4, "adaprelora": 5e-4}
CONFIGS = ("adamw", "adaprelora")

PROFILES = {
    "smoke": dict(heldout="smoke", judge_subjects=("heart",), confirm_subjects=("crescent",), judge_seeds=(0,),
                  confirm_seeds=(0,), judge=dict(per_background=1, prior_prompts=2, num_inference_steps=2),
                  run_timeout_s=300),
    # (a) on the headline's three judged subjects, (b) on the three confirmation subjects, seed 0:
    # 12 runs of ~200-300 s, two at a time.
    "quick": dict(heldout="quick", judge_subjects=("heart", "crescent", "arrow"),
                  confirm_subjects=H.CONFIRM_SUBJECTS, judge_seeds=(0,), confirm_seeds=(0,), judge={},
                  run_timeout_s=1800),
    # The confirmation of (a): every built-in subject x 5 seeds (20 pairs), (b) as in quick. The quick
    # profile's runs are the same runs (deterministic) and are kept by `--resume`: 34 new runs.
    "full": dict(heldout="quick", judge_subjects=SUBJECTS, confirm_subjects=H.CONFIRM_SUBJECTS,
                 judge_seeds=(0, 1, 2, 3, 4), confirm_seeds=(0,), judge={}, run_timeout_s=1800),
}


@dataclass(frozen=True)
class Claim:
    """One comparison of the headline: the part, the metric, whether it is relative, the direction
    AdaPreLoRA - AdamW had ("higher", "lower"; "not better" / "not worse": no interval wholly on
    AdaPreLoRA's better / worse side), and the headline's own figure."""

    part: str
    metric: str
    relative: bool
    expected: str
    headline: str
    higher_is_better: bool = False


# (a)'s figures are the confirmation's (`--full`: 4 subjects x 5 seeds, 20 pairs); (b)'s suite 4b's.
HEADLINE = (
    Claim("a", "subject_fidelity", False, "not better", "-0.048 [-0.088, -0.007]", higher_is_better=True),
    Claim("a", "subject_loss", True, "not worse", "-3.3% [-5.5, -1.3]"),
    Claim("a", "prior_loss", True, "higher", "+2.4% [+2.0, +2.9], every pair"),
    Claim("b", "subject_loss", True, "higher", "+5.3% [+4.7, +6.0], every pair"),
    Claim("b", "prior_loss", True, "lower", "-1.1% [-1.8, -0.4]"),
)
METRIC_NAMES = {"subject_fidelity": "judge subject fidelity", "subject_loss": "held-out subject loss",
                "prior_loss": "held-out prior loss"}


def tuned_lrs(configs, path: str = TUNE_JSON) -> dict:
    """{config: {"lr", "source"}}: the best lr of the tuning stage in `path`, else the fallback."""
    runs = H.load(path)["runs"] if os.path.isfile(path) else []
    out = {}
    for c in configs:
        t = H.tuned_lr(runs, c)
        if t is not None:
            out[c] = {"lr": float(t["best_lr"]), "source": os.path.relpath(path, REPO)}
        elif c in TUNED_LR_FALLBACK:
            out[c] = {"lr": TUNED_LR_FALLBACK[c], "source": "fallback constant (dreambooth_quick.TUNED_LR_FALLBACK)"}
        else:
            raise SystemExit(f"error: {c} has no tuning runs in {path}: run `python -m benchmarks.quality "
                             f"dreambooth-heldout --stage tune --configs {c}` first")
    return out


def plan(prof: dict, configs, app_lr: float, tuned: dict) -> list:
    """The runs: (a) every config at the app's lr on the judged subjects, (b) each at its tuned lr on
    the confirmation subjects. Within a pair the order alternates, so that dealing the list out to
    two workers gives each the same mix of optimizers."""
    jobs = []
    for part, subjects, seeds in (("a", prof["judge_subjects"], prof["judge_seeds"]),
                                  ("b", prof["confirm_subjects"], prof["confirm_seeds"])):
        for subject, seed in ((s, d) for d in seeds for s in subjects):
            order = list(configs) if (len(jobs) // len(configs)) % 2 == 0 else list(reversed(configs))
            for c in order:
                lr = app_lr if part == "a" else tuned[c]["lr"]
                jobs.append({"part": part, "config": c, "lr": lr, "subject": subject, "seed": seed})
    return jobs


def deal(jobs: list, workers: int) -> list:
    """Round-robin split of the runs over `workers` lists."""
    return [jobs[w::workers] for w in range(workers)]


# -- a worker process ----------------------------------------------------------------------------
def worker(jobs: list, out_path: str, profile: str, model_dir: Optional[str], tag: str) -> None:
    """Run `jobs` one after another in this process (one pipeline, held-out sets and judge), appending
    one JSON line per finished run (and the base model's held-out scores) to `out_path`."""
    from adaprelora.tiny_t2i import TINY_SD_DIR

    prof = PROFILES[profile]
    hprof = H.PROFILES[prof["heldout"]]
    model_dir = model_dir or TINY_SD_DIR
    work_dir = tempfile.mkdtemp(prefix="quality-db-quick-")

    def emit(row):
        with open(out_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    try:
        scorer = H.Scorer(model_dir, hprof, work_dir)
        judge = None
        for subject in dict.fromkeys(j["subject"] for j in jobs):
            emit({"base": subject, **scorer.score(subject, None)})
        for j in jobs:
            t0 = time.perf_counter()
            if j["part"] == "a":
                if judge is None:
                    from adaprelora.tiny_t2i.judge import load_judge

                    judge = load_judge(os.path.join(model_dir, "judge"))
                row = judge_check.run(j["config"], j["lr"], j["subject"], j["seed"], scorer, judge, work_dir,
                                      model_dir=model_dir, prof=hprof, judge_settings=prof["judge"])
            else:
                row = H.run_one(scorer, model_dir, j["subject"], H.config_for(j["config"]), j["lr"], j["seed"],
                                "confirm", hprof, work_dir)
            row.pop("curve", None)
            row.update(part=j["part"], seconds=time.perf_counter() - t0, worker=tag)
            emit(row)
            fid = f" fidelity {row['subject_fidelity']:.3f}" if row.get("subject_fidelity") is not None else ""
            print(f"  [{tag}] ({j['part']}) {j['config']:10s} lr={j['lr']:<7g} {j['subject']:12s} seed {j['seed']}: "
                  f"subject loss {row['subject_loss']:.5f} prior loss {row['prior_loss']:.5f}{fid} "
                  f"({row['seconds']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def launch(lists: list, profile: str, model_dir: Optional[str], threads: int, work_dir: str, log,
           on_rows: Optional[Callable[[list], None]] = None) -> tuple:
    """Start one worker process per non-empty list, wait for all within their time limits (a worker
    past its limit is killed; its finished runs count), calling `on_rows(rows so far)` whenever a
    run finishes, and return (rows, seconds per worker, load averages sampled while waiting,
    failed workers)."""
    prof = PROFILES[profile]
    procs = []
    for w, jobs in enumerate(lists):
        if not jobs:
            continue
        jobs_path, out_path = os.path.join(work_dir, f"jobs{w}.json"), os.path.join(work_dir, f"rows{w}.jsonl")
        with open(jobs_path, "w") as fh:
            json.dump(jobs, fh)
        cmd = [sys.executable, "-m", "benchmarks.quality.dreambooth_quick", "--jobs", jobs_path, "--out", out_path,
               "--profile", profile, "--threads", str(threads), "--tag", f"w{w}"]
        if model_dir:
            cmd += ["--model", model_dir]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        limit = prof["run_timeout_s"] * len(jobs) + 120
        procs.append((w, subprocess.Popen(cmd, cwd=REPO, env=env), time.perf_counter(), limit, out_path))
    loads, seconds, failed = [], {}, []
    pending = list(procs)
    paths = [item[-1] for item in procs]
    try:
        _wait(pending, loads, seconds, failed, log, lambda: _read_rows(paths), on_rows)
    finally:
        for _, proc, *_ in pending:  # only after an error here (e.g. Ctrl-C): stop the workers we started
            proc.kill()
            proc.wait(timeout=60)
    return _read_rows(paths), seconds, loads, failed


def _read_rows(paths: list) -> list:
    rows = []
    for path in paths:
        if os.path.isfile(path):
            with open(path) as fh:
                rows += [json.loads(line) for line in fh if line.strip()]
    return rows


def _wait(pending: list, loads: list, seconds: dict, failed: list, log, read, on_rows) -> None:
    """Wait for the workers in `pending` (removing each as it ends), killing any past its limit;
    `on_rows(read())` whenever the number of finished rows grows."""
    seen = 0
    while pending:
        loads.append(os.getloadavg()[0])
        if on_rows is not None:
            rows = read()
            if len(rows) > seen:
                seen = len(rows)
                on_rows(rows)
        for item in list(pending):
            w, proc, t0, limit, _ = item
            try:
                proc.wait(timeout=min(30.0, max(0.1, t0 + limit - time.perf_counter())))
            except subprocess.TimeoutExpired:
                if time.perf_counter() - t0 < limit:
                    continue
                log(f"error: worker w{w} ran past its limit of {limit} s: stopped, its finished runs kept")
                proc.kill()
                proc.wait(timeout=60)
            seconds[f"w{w}"] = time.perf_counter() - t0
            if proc.returncode != 0:
                failed.append(f"w{w} (exit {proc.returncode})")
            pending.remove(item)
            break


# -- the comparisons -----------------------------------------------------------------------------
def compare(runs: list, claim: Claim, candidate: str = "adaprelora", baseline: str = "adamw") -> Optional[dict]:
    """The paired difference candidate - baseline for one claim, with its interval, how many pairs
    went each way, and whether the headline's direction is reproduced."""
    def scores(label):
        return {(r["subject"], r["seed"]): r[claim.metric] for r in runs
                if r["part"] == claim.part and r["config"] == label and r.get(claim.metric) is not None}

    cand, base = scores(candidate), scores(baseline)
    iv = stats.paired_interval(cand, base, relative=claim.relative)
    if iv is None:
        return None
    diffs = list(stats.paired_differences(cand, base, relative=claim.relative).values())
    higher, lower, n = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs), len(diffs)
    if claim.expected == "higher":
        ok = iv["mean"] > 0 and higher > n / 2
    elif claim.expected == "lower":
        ok = iv["mean"] < 0 and lower > n / 2
    else:  # "not better" / "not worse": the interval does not lie wholly on the candidate's better / worse side
        better = (iv["lo"] > 0) == claim.higher_is_better
        ok = not (iv["excludes_zero"] and better == (claim.expected == "not better"))
    units = sorted(set(cand) & set(base))
    return {"part": claim.part, "metric": claim.metric, "relative": claim.relative, "expected": claim.expected,
            "headline": claim.headline, "interval": iv, "pairs": n, "pairs_higher": higher, "pairs_lower": lower,
            "candidate_mean": float(np.mean([cand[u] for u in units])),
            "baseline_mean": float(np.mean([base[u] for u in units])), "reproduced": bool(ok)}


def verdict_line(c: dict, lrs: str) -> str:
    name = METRIC_NAMES[c["metric"]]
    text = stats.interval_text(c["interval"], 3)
    if c["expected"] in ("not better", "not worse"):
        what = (f"AdaPreLoRA's {name} {c['expected']} than AdamW's ({lrs}): {text}, "
                f"higher in {c['pairs_higher']} of {c['pairs']} pairs")
    else:
        what = (f"AdaPreLoRA's {name} {c['expected']} than AdamW's ({lrs}) in "
                f"{c['pairs_higher'] if c['expected'] == 'higher' else c['pairs_lower']} of {c['pairs']} pairs, {text}")
    return f"({c['part']}) {what}: {'reproduced' if c['reproduced'] else 'NOT reproduced'} (headline {c['headline']})"


def report(result: dict, log=print) -> None:
    lrs = result["lrs"]
    rows = []
    for c in result["comparisons"]:
        digits = None if c["relative"] else 3
        rows.append([c["part"], METRIC_NAMES[c["metric"]], lrs[c["part"]]["adamw"], lrs[c["part"]]["adaprelora"],
                     c["pairs"], c["baseline_mean"], c["candidate_mean"], stats.interval_text(c["interval"], digits),
                     f"{c['pairs_higher']}/{c['pairs']}", c["headline"],
                     "yes" if c["reproduced"] else "NO"])
    log("\n== DreamBooth headline, small: AdaPreLoRA - AdamW, paired by (subject, seed), bootstrap 95% ==")
    log(C.format_table(["part", "metric", "AdamW lr", "AdaPreLoRA lr", "pairs", "AdamW", "AdaPreLoRA",
                        "difference [95%]", "AdaPreLoRA higher", "headline", "reproduced"], rows))
    for c in result["comparisons"]:
        part_lrs = lrs[c["part"]]
        text = (f"both at {part_lrs['adamw']:g}" if part_lrs["adamw"] == part_lrs["adaprelora"]
                else f"{part_lrs['adaprelora']:g} vs {part_lrs['adamw']:g}")
        log(verdict_line(c, text))
    log("\n== per subject, mean over seeds (AdamW / AdaPreLoRA) ==")
    log(C.format_table(SUBJECT_HEADERS, subject_rows(result)))
    missing = result.get("missing_runs", 0)
    verdict = ("reproduced" if result["reproduced"] else f"incomplete: {missing} of the runs missing, "
               "`--resume` runs them" if missing else "NOT reproduced")
    log(f"headline direction (AdaPreLoRA does not beat AdamW): {verdict}")


SUBJECT_HEADERS = ["part", "subject", "seeds", "fidelity", "subject loss", "prior loss"]


def subject_rows(result: dict) -> list:
    """Each part's (subject) means over the seeds both optimizers finished, "AdamW / AdaPreLoRA"."""
    rows = []
    for part in ("a", "b"):
        for subject in dict.fromkeys(r["subject"] for r in result["runs"] if r["part"] == part):
            by = {c: {r["seed"]: r for r in result["runs"] if (r["part"], r["subject"], r["config"]) == (part, subject, c)}
                  for c in CONFIGS}
            seeds = sorted(set(by["adamw"]) & set(by["adaprelora"]))
            if not seeds:
                continue

            def pair(metric, fmt):
                vals = [[by[c][d].get(metric) for d in seeds] for c in CONFIGS]
                if any(v is None for vs in vals for v in vs):
                    return "-"
                return " / ".join(fmt.format(float(np.mean(vs))) for vs in vals)

            rows.append([part, subject, len(seeds), pair("subject_fidelity", "{:.3f}"),
                         pair("subject_loss", "{:.4f}"), pair("prior_loss", "{:.4f}")])
    return rows


# -- the command ---------------------------------------------------------------------------------
def main(args, log=print) -> int:
    """The `dreambooth` suite of `python -m benchmarks.quality` (args: its parsed flags)."""
    from adaprelora.tiny_t2i.personalise import DREAMBOOTH_DEFAULTS

    t_start = time.perf_counter()
    profile = args.profile or "quick"
    prof = PROFILES[profile]
    configs = list(CONFIGS)
    if args.configs and args.configs.split(",") != configs:
        return _usage_error("--configs: dreambooth compares adamw and adaprelora only; for other optimizers use "
                            "`dreambooth-heldout` or `dreambooth-nopp`")
    if args.subjects:
        return _usage_error("--subjects: dreambooth runs the built-in subjects of the headline; "
                            "use `dreambooth-nopp --subjects DIR` for your own")
    if args.workers < 1:
        return _usage_error(f"--workers {args.workers}: give at least 1")
    name = SUITE + (f"_{args.tag}" if args.tag else "")
    path = os.path.join(args.out_dir or C.RESULTS_DIR, f"quality_{name}.json" if profile == "quick"
                        else f"quality_{name}_{profile}.json")  # where C.write_json puts it
    if args.report:
        if not os.path.isfile(path):
            return _usage_error(f"--report: no results in {path}: run `python -m benchmarks.quality dreambooth` first")
        with open(path) as fh:
            report(rescore(json.load(fh)), log)
        return 0
    app_lr = float(DREAMBOOTH_DEFAULTS["learning_rate"])
    tuned = tuned_lrs(configs)
    jobs = plan(prof, configs, app_lr, tuned)
    # --full trains and scores as --quick does (the same held-out profile), so it keeps quick's runs too
    sources = [path] + ([os.path.join(args.out_dir or C.RESULTS_DIR, f"quality_{name}.json")]
                        if prof["heldout"] == PROFILES["quick"]["heldout"] else [])
    earlier, kept_from = kept_runs(sources if getattr(args, "resume", False) else [], jobs)
    done = {job_key(r) for r in earlier["runs"]}
    kept_from = ", ".join(os.path.relpath(p, REPO) for p in kept_from) or "none"
    todo = [j for j in jobs if job_key(j) not in done]
    workers = max(1, min(args.workers, len(todo) or 1))
    load_start = os.getloadavg()
    log(f"dreambooth ({profile}): {len(todo)} runs on {workers} workers ({len(done)} kept, from {kept_from}); (a) at the "
        f"app's lr {app_lr:g}, (b) at the tuned lrs " + ", ".join(f"{c} {t['lr']:g} ({t['source']})" for c, t in tuned.items()))
    header = {
        "suite": "dreambooth", "profile": profile, "commit": H._git_commit(),
        "machine": {**C.machine_info(), "machine": "2-core x86_64 CPU, shared"},
        "model": os.path.relpath(args.model) if args.model else "assets/tiny-sd",
        "setup": {**H._setup(H.PROFILES[prof["heldout"]]), "judge": {**judge_check.JUDGE, **prof["judge"]},
                  "judge_subjects": list(prof["judge_subjects"]), "confirm_subjects": list(prof["confirm_subjects"]),
                  "judge_seeds": list(prof["judge_seeds"]), "confirm_seeds": list(prof["confirm_seeds"])},
        "lrs": {"a": {c: app_lr for c in configs}, "b": {c: tuned[c]["lr"] for c in configs}},
        "tuned_lr_source": {c: tuned[c]["source"] for c in configs},
        "workers": workers, "threads": args.threads,
        "command": "python -m benchmarks.quality " + " ".join(getattr(args, "argv", []) or ["dreambooth"]),
    }

    def write(rows: list, **extra) -> dict:
        result = build(header, jobs, earlier, rows)
        result.update(extra, wall_s=time.perf_counter() - t_start)
        C.write_json(result, name, profile, args.out_dir)
        return result

    work_dir = tempfile.mkdtemp(prefix="quality-db-quick-")
    cpu0 = _children_cpu_s()
    try:
        rows, worker_s, loads, failed = launch(deal(todo, workers), profile, args.model, args.threads, work_dir, log,
                                               on_rows=write)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    result = write(rows, failed_workers=failed, worker_s=worker_s, worker_cpu_s=_children_cpu_s() - cpu0,
                   loadavg_1min={"start": load_start[0], "mean": float(np.mean(loads)) if loads else None,
                                 "max": float(max(loads)) if loads else None})
    report(result, log)
    log(f"[dreambooth] wrote {path} ({result['wall_s']:.0f} s; runs {result['run_s_sum']:.0f} s in all, worker CPU "
        f"{result['worker_cpu_s']:.0f} s; {len(result['runs'])} of {len(jobs)} runs; load average "
        f"{result['loadavg_1min']['mean'] or 0:.1f})")
    if failed or result["missing_runs"]:
        log(f"error: {result['missing_runs']} run(s) did not finish (workers: {', '.join(failed) or 'stopped'}); "
            "the table covers the finished ones; `--resume` runs only the missing ones")
        return 1
    return 0


def kept_runs(paths: list, jobs: list) -> tuple:
    """({"runs", "base"}, the files they came from): the finished runs of `jobs` found in the results
    files `paths`, first file first. A larger profile's jobs include the quick profile's, which are the
    same runs (each run is deterministic), so `--full --resume` keeps what `--quick` ran."""
    wanted, seen, earlier, used = {job_key(j) for j in jobs}, set(), {"runs": [], "base": {}}, []
    for path in dict.fromkeys(paths):
        if not os.path.isfile(path):
            continue
        with open(path) as fh:
            kept = json.load(fh)
        new = [r for r in kept["runs"] if job_key(r) in wanted and job_key(r) not in seen]
        seen.update(job_key(r) for r in new)
        earlier["runs"] += new
        earlier["base"] = {**kept.get("base", {}), **earlier["base"]}
        if new:
            used.append(path)
    return earlier, used


def job_key(run: dict) -> tuple:
    return run["part"], run["config"], float(run["lr"]), run["subject"], int(run["seed"])


def build(header: dict, jobs: list, earlier: dict, rows: list) -> dict:
    """The results file: the header, every finished run (kept ones first), the comparisons."""
    runs = earlier["runs"] + [r for r in rows if "base" not in r]
    base = {**earlier.get("base", {}), **{r["base"]: {k: v for k, v in r.items() if k != "base"}
                                          for r in rows if "base" in r}}
    missing = len(jobs) - len(runs)
    return rescore({**header, "base": base, "runs": runs, "missing_runs": missing, "complete": missing == 0,
                    "run_s_sum": float(sum(r["seconds"] for r in runs))})


def rescore(result: dict) -> dict:
    """The results file with its comparisons made again against the current `HEADLINE` claims."""
    comparisons = [c for c in (compare(result["runs"], claim) for claim in HEADLINE) if c is not None]
    complete = result.get("missing_runs", 0) == 0
    return {**result, "comparisons": comparisons,
            "reproduced": bool(comparisons) and complete and all(c["reproduced"] for c in comparisons)}


def _children_cpu_s() -> float:
    """User + system CPU seconds of the finished child processes (the workers)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _usage_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _worker_main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="one worker of `python -m benchmarks.quality dreambooth` (internal)")
    ap.add_argument("--jobs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", choices=sorted(PROFILES), required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="w0")
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    with open(args.jobs) as fh:
        worker(json.load(fh), args.out, args.profile, args.model, args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
