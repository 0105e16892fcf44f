"""The held-out loss as a trainer feature: `train_dreambooth.py --validation_split /
--validation_loss_data_dir / --validation_loss_steps` through `accelerate launch` on the tiny SD
pipeline (validation_loss.jsonl, the tracker, the best step, determinism, bad flags), and
`finetune_llm.py --eval_steps` on a tiny LM (metrics.json, the loss log, against a float64 reference)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaprelora.training.dreambooth.validation_loss_log import ValidationLossLog, best_record, read_validation_losses

ROOT = Path(__file__).resolve().parents[1]


def _records(out: Path) -> list[dict]:
    path = out / "validation_loss.jsonl"
    assert path.is_file(), f"validation_loss.jsonl missing from {sorted(os.listdir(out))}"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _final_line(proc) -> str:
    return proc.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# DreamBooth through accelerate launch


@pytest.fixture(scope="module")
def split_runs(launch, dreambooth_args, tiny_sd, instance_dir, tmp_path_factory):
    """Two identical runs (seed 0) holding out a third of the three instance images, evaluated every step."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp("split") / name
        proc = launch(dreambooth_args(tiny_sd, instance_dir, out, 2)
                      + ["--validation_split", "0.34", "--validation_loss_steps", "1", "--report_to", "tensorboard",
                         "--optimizer", "adamw", "--learning_rate", "1e-2", "--skip_export_check"])
        runs.append((out, proc))
    return runs


@pytest.mark.slow
def test_validation_split_writes_one_line_per_evaluation_and_names_the_best_step(split_runs):
    out, proc = split_runs[0]
    assert "holding out 1 of 3 instance image(s) for the validation loss, training on 2" in proc.stderr
    records = _records(out)
    assert [r["step"] for r in records] == [0, 1, 2], records
    assert all(set(r) == {"step", "validation_loss"} for r in records), "no prior loss without prior preservation"
    assert all(math.isfinite(r["validation_loss"]) and r["validation_loss"] > 0 for r in records)
    for r in records:  # each evaluation is also on stderr as it happens
        assert f"validation loss {r['validation_loss']:.5f} at step {r['step']}" in proc.stderr
    best = min(records, key=lambda r: r["validation_loss"])
    assert f"best validation loss {best['validation_loss']:.5f} at step {best['step']}" in _final_line(proc)
    assert records[1]["validation_loss"] != records[0]["validation_loss"], "training must move the held-out loss"


@pytest.mark.slow
def test_validation_loss_is_logged_to_the_tracker_with_the_training_loss(split_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = split_runs[0]
    event_files = sorted((out / "logs").rglob("events.out.tfevents.*"))
    assert event_files, f"no TensorBoard event file under {out / 'logs'}"
    scalars = {}
    for path in event_files:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    assert {"loss", "validation_loss"} <= set(scalars), sorted(scalars)
    records = _records(out)
    logged = sorted(scalars["validation_loss"])
    assert [s for s, _ in logged] == [r["step"] for r in records]
    for (_, value), r in zip(logged, records):
        assert value == pytest.approx(r["validation_loss"], rel=1e-6)


@pytest.mark.slow
def test_the_same_weights_give_the_same_validation_loss_across_runs(split_runs):
    (out_a, _), (out_b, _) = split_runs
    first, second = _records(out_a), _records(out_b)
    # Step 0 scores the base model on the held-out image at fixed timesteps and noise: bit for bit the same.
    assert first[0] == second[0]
    # The same seed trains the same weights on the CPU, and the same weights score the same.
    assert first == second


@pytest.mark.slow
def test_held_out_folder_with_prior_preservation_also_measures_the_prior(launch, dreambooth_args, tiny_sd,
                                                                           instance_dir, write_images, tmp_path):
    """`--validation_loss_data_dir` images score the subject; the first class images score the
    prior (its drift) in every line."""
    class_dir = tmp_path / "class"
    write_images(class_dir, [(32, 32), (32, 32)], prefix="class", seed=5)
    held_out = tmp_path / "held-out"
    write_images(held_out, [(40, 32), (32, 32)], prefix="held", seed=7)
    (held_out / "held0.txt").write_text("a photo of sks toy on a beach")
    out = tmp_path / "out"
    proc = launch(dreambooth_args(tiny_sd, instance_dir, out, 2)
                  + ["--validation_loss_data_dir", str(held_out), "--validation_loss_steps", "5",
                     "--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt",
                     "a photo of a toy", "--num_class_images", "2", "--optimizer", "adamw", "--learning_rate", "1e-2",
                     "--report_to", "none", "--skip_export_check"])
    assert "found 2 held-out image(s) for the validation loss" in proc.stderr
    assert "found 3 instance image(s)" in proc.stderr and "holding out" not in proc.stderr, "all 3 train"
    records = _records(out)
    assert [r["step"] for r in records] == [0, 2], "before the first step and after the last"
    for r in records:
        assert set(r) == {"step", "validation_loss", "prior_validation_loss"}
        assert math.isfinite(r["validation_loss"]) and math.isfinite(r["prior_validation_loss"])
    assert records[1]["validation_loss"] != records[0]["validation_loss"]
    assert records[1]["prior_validation_loss"] != records[0]["prior_validation_loss"], "the prior must drift"
    assert f"(prior {records[0]['prior_validation_loss']:.5f}) at step 0" in proc.stderr
    assert "best validation loss" in _final_line(proc)


BAD_FLAGS = {  # through the CLI; the other checks of validate() in process below
    "split one": (["--validation_split", "1"], "--validation_split must be between 0 and 1"),
    "dir without images": (["--validation_loss_data_dir", "{tmp}/empty"], "no PNG, JPEG or WebP image"),
    "both sources": (["--validation_split", "0.5", "--validation_loss_data_dir", "{instance}"], "use one of the two"),
    "nothing left to train on": (["--instance_data_dir", "{tmp}/single", "--validation_split", "0.5"],
                                 "--validation_split needs at least 2 usable instance images"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
@pytest.mark.slow
def test_bad_validation_loss_flags_are_one_clear_line(case, tiny_sd, instance_dir, write_images, tmp_path):
    """Run as `python train_dreambooth.py` (one device): `accelerate launch` turns every non-zero exit
    of the script into 1, and the script's own code is what a caller of the script sees."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    write_images(tmp_path / "single", [(32, 32)])
    args, expected = BAD_FLAGS[case]
    args = [a.format(tmp=tmp_path, instance=instance_dir) for a in args]
    base = ["--pretrained_model_name_or_path", tiny_sd, "--instance_data_dir", instance_dir,
            "--instance_prompt", "a photo of sks toy", "--output_dir", str(tmp_path / "out"),
            "--resolution", "32", "--max_train_steps", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "train_dreambooth.py"), *base, *args], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=480)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert not (tmp_path / "out" / "validation_loss.jsonl").exists()
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_flags_reach_the_config_and_validate_names_them(instance_dir):
    sys.path.insert(0, str(ROOT))
    try:
        import train_dreambooth
    finally:
        sys.path.remove(str(ROOT))
    from adaprelora.training.errors import UserError

    base = ["--pretrained_model_name_or_path", "any/model", "--instance_data_dir", instance_dir]  # not loaded
    config = train_dreambooth.parse_args(base)
    assert (config.validation_split, config.validation_loss_data_dir, config.validation_loss_steps) == (None, None, 100)
    assert not config.uses_validation_loss
    config = train_dreambooth.parse_args(base + ["--validation_split", "0.2", "--validation_loss_steps", "25"])
    assert (config.validation_split, config.validation_loss_steps) == (0.2, 25) and config.uses_validation_loss
    config.validate()
    for flags, expected in [(["--validation_split", "-0.1"], "--validation_split must be between 0 and 1"),
                            (["--validation_split", "0"], "--validation_split must be between 0 and 1"),
                            (["--validation_split", "0.3", "--validation_loss_steps", "0"],
                             "--validation_loss_steps must be at least 1"),
                            (["--validation_loss_data_dir", os.path.join(instance_dir, "nope")], "does not exist"),
                            (["--validation_split", "0.3", "--validation_loss_data_dir", instance_dir], "one of the two")]:
        with pytest.raises(UserError, match=expected):
            train_dreambooth.parse_args(base + flags).validate()


def test_the_log_keeps_earlier_steps_on_resume_and_names_the_best(tmp_path):
    log = ValidationLossLog(str(tmp_path))
    for step, value in [(0, 0.5), (10, 0.3), (20, 0.4)]:
        log.add(step, value, prior_validation_loss=0.1)
    assert log.best() == {"step": 10, "validation_loss": 0.3, "prior_validation_loss": 0.1}
    resumed = ValidationLossLog(str(tmp_path), start_step=20)  # a run resumed at step 20 re-evaluates it
    assert [r["step"] for r in resumed.records] == [0, 10]
    resumed.add(20, 0.2)
    assert [r["step"] for r in read_validation_losses(resumed.path)] == [0, 10, 20]
    assert resumed.best()["step"] == 20
    assert best_record([{"step": 1, "validation_loss": float("nan")}]) is None
    ValidationLossLog(str(tmp_path))  # a fresh run in the same folder starts an empty file
    assert read_validation_losses(resumed.path) == []


# ---------------------------------------------------------------------------------------------
# finetune_llm.py --eval_steps


def _run_finetune(args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(cwd / "hf_datasets_cache"), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "finetune_llm.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=480)
    if check:
        assert proc.returncode == 0, f"finetune_llm.py failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _gsm8k_rows(n, offset=0):
    return [{"question": f"Tom has {i} apples and buys {i + 2} more. How many now?",
             "answer": f"{i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}\n#### {2 * i + 2}"}
            for i in range(offset, offset + n)]


def _write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from adaprelora.testing.tiny_lm import save_tiny_lm

    return save_tiny_lm("llama", str(tmp_path_factory.mktemp("tiny_lm") / "llama"))


@pytest.mark.slow
def test_eval_steps_reports_a_falling_heldout_loss_in_metrics_and_logs(tmp_path, tiny_llama):
    train = _write_jsonl(tmp_path / "train.jsonl", _gsm8k_rows(16))
    val = _write_jsonl(tmp_path / "val.jsonl", _gsm8k_rows(4, offset=100))
    out = tmp_path / "out"
    proc = _run_finetune(["--task", "gsm8k", "--model_name_or_path", tiny_llama, "--optimizer", "adamw",
                          "--learning_rate", "1e-2", "--train_file", train, "--validation_file", val,
                          "--max_steps", 6, "--eval_steps", 3, "--per_device_train_batch_size", 4,
                          "--max_new_tokens", 4, "--output_dir", out], tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["eval_loss_history"]
    assert [h["step"] for h in history] == [0, 3, 6], history
    assert all(math.isfinite(h["eval_loss"]) for h in history)
    assert history[-1]["eval_loss"] < history[0]["eval_loss"], "training on the template must lower the held-out loss"
    assert metrics["eval_loss"] == history[-1]["eval_loss"]
    best = min(history, key=lambda h: h["eval_loss"])
    assert (metrics["best_eval_loss_step"], metrics["best_eval_loss"]) == (best["step"], best["eval_loss"])
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log if "eval_loss" in row] == [3, 6]
    assert [row["eval_loss"] for row in log if "eval_loss" in row] == [h["eval_loss"] for h in history[1:]]
    for h in history:
        assert f"eval_loss {h['eval_loss']:.5f} at step {h['step']}" in proc.stdout + proc.stderr
    assert f"best eval_loss {best['eval_loss']:.5f} at step {best['step']}" in proc.stdout


def test_eval_steps_below_one_is_one_clear_line(tmp_path, tiny_llama):
    train = _write_jsonl(tmp_path / "train.jsonl", _gsm8k_rows(4))
    proc = _run_finetune(["--task", "gsm8k", "--model_name_or_path", tiny_llama, "--train_file", train,
                          "--validation_file", train, "--eval_steps", 0, "--output_dir", tmp_path / "out"],
                         tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--eval_steps must be at least 1" in errors[0], proc.stderr


@pytest.mark.parametrize("task", ["gsm8k", "glue:sst2", "glue:stsb"])
def test_heldout_loss_matches_a_float64_reference_per_example(task, tiny_llama):
    """`heldout_loss` against each example scored alone by the model's own loss in float64: padding,
    masked prompt tokens and the mean over examples (not over batches or tokens) must all be right."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from adaprelora.training.llm import CausalLMCollator, build_causal_lm_example, get_task
    from adaprelora.training.llm.eval import heldout_loss

    spec = get_task(task)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    if spec.family == "glue":
        model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=spec.num_labels)
        model.config.pad_token_id = tokenizer.pad_token_id
        texts = ["a good movie", "a bad film that goes on and on", "fine", "not good at all, no", "ok then"]
        labels = [1.5, 0.2, 3.0, 4.9, 2.2] if spec.is_regression else [1, 0, 1, 0, 1]
        examples = [{**tokenizer(t), "labels": y} for t, y in zip(texts, labels)]

        def collate(features):
            width = max(len(f["input_ids"]) for f in features)
            pad = tokenizer.pad_token_id
            return {"input_ids": torch.tensor([f["input_ids"] + [pad] * (width - len(f["input_ids"]))
                                               for f in features]),
                    "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"]))
                                                    for f in features]),
                    "labels": torch.tensor([f["labels"] for f in features])}
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        examples = [build_causal_lm_example(tokenizer, f"Question: {q}\nAnswer:", f" {a}", 64)
                    for q, a in [("1+1?", "2"), ("what is two plus three, please?", "it is 5"), ("9-3?", "six, 6")]]
        collate = CausalLMCollator(tokenizer.pad_token_id)
    model.eval()
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(torch.utils.data.DataLoader(examples, batch_size=2, collate_fn=collate))
    value = heldout_loss(model, loader, accelerator, spec)

    reference = model.to(torch.float64)
    if spec.family == "glue" and spec.is_regression:
        reference.config.problem_type = "regression"
    per_example = []
    with torch.no_grad():
        for example in examples:
            batch = collate([example])  # alone: no padding
            if spec.family == "glue" and spec.is_regression:
                batch["labels"] = batch["labels"].double()
            per_example.append(float(reference(**batch).loss))
    assert value == pytest.approx(sum(per_example) / len(per_example), rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# The app's loss chart


def test_the_loss_chart_draws_the_validation_loss_as_its_own_curve():
    from adaprelora.app.jobs import loss_frame

    frame = loss_frame([(1, 1.0), (2, 0.5)], [(0, 0.9), (2, 0.7)])
    validation = frame[frame["curve"] == "validation"]
    assert validation[["step", "loss"]].values.tolist() == [[0, 0.9], [2, 0.7]]
    assert frame[frame["curve"] == "loss"]["loss"].tolist() == [1.0, 0.5]
    assert frame[frame["curve"] == "smoothed"]["loss"].tolist() == pytest.approx([1.0, 0.95])
    assert set(loss_frame([(1, 1.0)])["curve"]) == {"loss", "smoothed"}, "no held-out images: no third curve"


@pytest.mark.slow
def test_an_app_run_with_held_out_images_charts_them_and_names_the_best_step(tiny_sd, instance_dir, tmp_path):
    from adaprelora.app.jobs import TrainingJob, TrainingRun
    from adaprelora.app.store import LoraStore
    from adaprelora.training.dreambooth import TrainConfig

    store = LoraStore(str(tmp_path / "loras"))
    info = store.create("held-out", {})
    config = TrainConfig(pretrained_model_name_or_path=tiny_sd, instance_data_dir=instance_dir,
                         instance_prompt="a photo of sks toy", output_dir=info.path, resolution=32,
                         train_batch_size=1, max_train_steps=2, seed=0, report_to="none", optimizer="adamw",
                         learning_rate=1e-2, validation_split=0.34, validation_loss_steps=1, skip_export_check=True)
    updates = list(TrainingRun(store, info, config, TrainingJob(name=info.name)).updates(lambda *a, **k: None))
    final = updates[-1]
    records = _records(Path(info.path))
    frame = final["loss_plot"]
    validation = frame[frame["curve"] == "validation"]
    assert validation[["step", "loss"]].values.tolist() == [[r["step"], r["validation_loss"]] for r in records]
    best = min(records, key=lambda r: r["validation_loss"])
    summary = final["summary"]
    assert (summary["best_validation_step"], summary["best_validation_loss"]) == (best["step"],
                                                                                   best["validation_loss"])
