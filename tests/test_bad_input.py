"""Bad input through both command lines: one `error:` line that says what is wrong, exit 2, no
traceback, and nothing left in the output folder that passes for a finished result.

Each kind of mistake goes through the real entry point once (`accelerate launch train_dreambooth.py`,
`python finetune_llm.py`); the checks behind them are pure functions, tested here on many cases at
once without a subprocess (every float flag of both configs, image modes, optimizer arguments...).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaprelora.training.errors import MAX_INT, MAX_SEED, TrainingDiverged, UserError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Files whose presence says "this run finished": none may be left by a run that failed.
DREAMBOOTH_FINISHED = ("pytorch_lora_weights.safetensors", "README.md")
LLM_FINISHED = ("adapter_model.safetensors", "adapter_config.json", "metrics.json")


# `accelerate launch` exits 1 whenever its script fails (the script itself exits 2, as `python` shows).
LAUNCH_FAILED = 1


def assert_one_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Exit `code`, no traceback, no library ERROR log lines, exactly one `error:` line holding `needles`."""
    both = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}\n{both}"
    assert "Traceback" not in both, both
    assert not [line for line in proc.stderr.splitlines() if " ERROR " in line or line.startswith("ERROR")], both
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def assert_nothing_finished(out: Path, names) -> None:
    left = [name for name in names if (out / name).exists()]
    assert not left, f"{left} left in {out}"
    if out.is_dir():
        assert not [p for p in out.glob("*.safetensors")], sorted(os.listdir(out))


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from adaprelora.testing.tiny_sd import build_tiny_sd_pipeline

    path = tmp_path_factory.mktemp("tiny-sd") / "model"
    build_tiny_sd_pipeline(str(path))
    return str(path)


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("instance") / "toy"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return str(folder)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    from adaprelora.testing.tiny_lm import save_tiny_lm

    return save_tiny_lm("llama", str(tmp_path_factory.mktemp("tiny_lm") / "llama"))


def sst2_rows(n: int) -> list[dict]:
    return [{"sentence": f"a good movie {i}" if i % 2 else f"a bad film {i}", "label": i % 2} for i in range(n)]


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def dreambooth_args(tiny_model, instance_dir, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", tiny_model, "--instance_data_dir", str(instance_dir),
            "--instance_prompt", "a photo of sks toy", "--output_dir", str(out), "--resolution", "32",
            "--train_batch_size", "1", "--max_train_steps", "1", "--seed", "0", "--mixed_precision", "no",
            "--report_to", "none", *map(str, extra)]


def run_llm(args, cwd: Path, home: Path | None = None) -> subprocess.CompletedProcess:
    """`python finetune_llm.py ARGS` as a user runs it; `home` replaces HOME and the Hugging Face
    cache variables, to see what a run writes outside its output folder."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if home is not None:
        for name in ("HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME"):
            env.pop(name, None)
        env["HOME"] = str(home)
    return subprocess.run([sys.executable, str(ROOT / "finetune_llm.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def llm_args(tiny_lm, train_file, out, *extra, validation_file=None) -> list[str]:
    return ["--task", "glue:sst2", "--model_name_or_path", tiny_lm, "--train_file", train_file,
            "--validation_file", validation_file or train_file, "--output_dir", out, "--max_steps", "2",
            "--per_device_train_batch_size", "4", *extra]


# ------------------------------------------------------------------------------------------------
# Non-finite numbers (flags, loss, weights) and failed export checks
# ------------------------------------------------------------------------------------------------
def test_dreambooth_infinite_learning_rate_is_refused_before_loading(launch, tiny_model, instance_dir, tmp_path):
    out = tmp_path / "out"
    proc = launch(dreambooth_args(tiny_model, instance_dir, out, "--learning_rate", "inf"), expect_ok=False)
    assert_one_error(proc, "--learning_rate must be a finite number, got inf", code=LAUNCH_FAILED)
    assert not out.exists()


def test_llm_infinite_learning_rate_is_refused_before_loading(tiny_lm, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sst2_rows(8))
    out = tmp_path / "out"
    proc = run_llm(llm_args(tiny_lm, train, out, "--learning_rate", "inf"), tmp_path)
    assert_one_error(proc, "--learning_rate must be a finite number, got inf")
    assert not out.exists()


@pytest.fixture(scope="module")
def diverged_dreambooth(launch, tiny_model, instance_dir, tmp_path_factory):
    """A finite but absurd learning rate without clipping: step 1 is checkpointed, step 2 is NaN."""
    out = tmp_path_factory.mktemp("diverged-db") / "out"
    proc = launch(dreambooth_args(tiny_model, instance_dir, out, "--optimizer", "adamw", "--learning_rate", "1e30",
                                  "--max_grad_norm", "0", "--max_train_steps", "4", "--checkpointing_steps", "1"),
                  expect_ok=False)
    return out, proc


def test_dreambooth_run_that_goes_nonfinite_stops_and_keeps_only_good_checkpoints(diverged_dreambooth):
    out, proc = diverged_dreambooth
    line = assert_one_error(proc, "training diverged at step 2", "--learning_rate", "--max_grad_norm",
                            code=LAUNCH_FAILED)
    assert "nan" in line or "inf" in line
    assert_nothing_finished(out, DREAMBOOTH_FINISHED)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoint-1" / "pytorch_lora_weights.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def test_dreambooth_resume_with_another_rank_names_the_rank(diverged_dreambooth, launch, tiny_model, instance_dir):
    out, _ = diverged_dreambooth
    proc = launch(dreambooth_args(tiny_model, instance_dir, out, "--rank", "8", "--max_train_steps", "2",
                                  "--resume_from_checkpoint", "latest"), expect_ok=False)
    assert_one_error(proc, "rank 4", "--rank 8", "resume with --rank 4", code=LAUNCH_FAILED)
    assert_nothing_finished(out, DREAMBOOTH_FINISHED)


@pytest.fixture(scope="module")
def diverged_llm(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("diverged-llm")
    train = write_jsonl(root / "train.jsonl", sst2_rows(16))
    out = root / "out"
    proc = run_llm(llm_args(tiny_lm, train, out, "--optimizer", "adamw", "--learning_rate", "1e30",
                            "--max_steps", "4", "--checkpointing_steps", "1"), root)
    return root, train, out, proc


def test_llm_run_that_goes_nonfinite_stops_and_keeps_only_good_checkpoints(diverged_llm):
    _, _, out, proc = diverged_llm
    assert_one_error(proc, "training diverged at step 2", "--learning_rate")
    assert_nothing_finished(out, LLM_FINISHED)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    logged = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1] and all(np.isfinite(row["loss"]) for row in logged)


def test_llm_resume_with_another_rank_names_the_rank(diverged_llm, tiny_lm):
    root, train, out, _ = diverged_llm
    proc = run_llm(llm_args(tiny_lm, train, out, "--lora_r", "16", "--max_steps", "3",
                            "--resume_from_checkpoint", "latest"), root)
    assert_one_error(proc, "rank 8", "--lora_r 16", "resume with --lora_r 8")
    assert_nothing_finished(out, LLM_FINISHED)


def test_every_number_setting_must_be_usable(tiny_model, instance_dir, tmp_path):
    """Every float field of both configs, set to inf, -inf or nan, and every integer field set beyond
    32 bits, is one error naming its flag."""
    import dataclasses

    from adaprelora.training.dreambooth import TrainConfig
    from adaprelora.training.llm import FinetuneConfig

    train = write_jsonl(tmp_path / "t.jsonl", sst2_rows(2))
    configs = {
        TrainConfig: dict(pretrained_model_name_or_path=tiny_model, instance_data_dir=instance_dir,
                          instance_prompt="sks", output_dir=str(tmp_path / "db"), report_to="none"),
        FinetuneConfig: dict(task="glue:sst2", model_name_or_path="m", output_dir=str(tmp_path / "llm"),
                             train_file=train, validation_file=train),
    }
    checked = []
    for cls, base in configs.items():
        cls(**base).validate()  # the base is valid
        hints = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        for name, hint in hints.items():
            if "float" not in hint or "list" in hint:
                continue
            for bad in (float("inf"), float("-inf"), float("nan")):
                with pytest.raises(UserError, match=f"^--{name} must be a finite number, got {bad}$"):
                    cls(**base, **{name: bad}).validate()
            checked.append(name)
        for name, hint in hints.items():
            if hint in ("int", "Optional[int]") and name != "seed":
                with pytest.raises(UserError, match=f"^--{name} is too large: at most {MAX_INT}, got {2**40}$"):
                    cls(**base, **{name: 2**40}).validate()
                checked.append(name)
    assert {"rank", "resolution", "lora_r", "max_seq_length", "per_device_train_batch_size"} <= set(checked)
    assert {"learning_rate", "lora_alpha", "max_grad_norm", "snr_gamma", "noise_offset", "prior_loss_weight",
            "warmup_ratio", "num_train_epochs", "lora_dropout", "lr_power"} <= set(checked)


def test_a_nan_loss_stops_the_shared_loop_at_its_step(tmp_path):
    """training_steps on a real Accelerator: the step whose loss is NaN raises TrainingDiverged naming
    it, after the good steps were yielded; the weights the trainer sees at each event are finite."""
    from adaprelora.training.loop import make_accelerator, release_accelerator, training_steps

    class Loader(list):
        def set_epoch(self, epoch):
            pass

    accelerator = make_accelerator(mixed_precision="no", gradient_accumulation_steps=1, seed=0, cpu=True)
    try:
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        batches = Loader([torch.ones(2, 3), torch.ones(2, 3), torch.full((2, 3), float("nan")), torch.ones(2, 3)])
        steps = training_steps(accelerator, models=[model], dataloader=batches, optimizer=optimizer,
                               lr_scheduler=scheduler, compute_loss=lambda x: model(x).pow(2).mean(), start_step=0,
                               max_steps=4, updates_per_epoch=4, stop_event=threading.Event())
        seen = []
        with pytest.raises(TrainingDiverged, match=r"^training diverged at step 3: the loss is nan"):
            for event in steps:
                seen.append(event.step)
                assert all(torch.isfinite(p).all() for p in model.parameters())
        assert seen == [1, 2]
    finally:
        release_accelerator(accelerator)


@pytest.mark.parametrize("scaled", [False, True])
def test_a_nan_loss_under_an_fp16_loss_scaler_is_tolerated_a_few_steps(scaled):
    """A loss scaler skips steps whose loss is not finite (the weights stay), so the loop stops only
    after SCALER_NONFINITE_LIMIT of them in a row; without a scaler, at the first. Here the loss is
    NaN from step 2 on while its gradient stays finite (a NaN constant is added)."""
    from adaprelora.training.loop import (
        SCALER_NONFINITE_LIMIT,
        make_accelerator,
        release_accelerator,
        training_steps,
    )

    class Loader(list):
        def set_epoch(self, epoch):
            pass

    accelerator = make_accelerator(mixed_precision="no", gradient_accumulation_steps=1, seed=0, cpu=True)
    try:
        if scaled:  # fp16 needs a GPU; the loop only asks whether a scaler is in use
            accelerator.scaler = torch.amp.GradScaler("cpu", enabled=False)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        n = SCALER_NONFINITE_LIMIT + 3
        batches = Loader([(torch.ones(2, 3), 0.0)] + [(torch.ones(2, 3), float("nan"))] * (n - 1))

        def loss(batch):
            x, offset = batch
            return model(x).pow(2).mean() + offset

        steps = training_steps(accelerator, models=[model], dataloader=batches, optimizer=optimizer,
                               lr_scheduler=scheduler, compute_loss=loss, start_step=0, max_steps=n, updates_per_epoch=n,
                               stop_event=threading.Event())
        seen = []
        stop_at = 1 + SCALER_NONFINITE_LIMIT if scaled else 2
        with pytest.raises(TrainingDiverged, match=f"^training diverged at step {stop_at}: the loss is nan;"):
            for event in steps:
                seen.append(event.step)
        assert seen == list(range(1, stop_at))
    finally:
        release_accelerator(accelerator)


def test_failed_export_check_exits_nonzero_and_sets_the_files_aside(tiny_model, instance_dir, tmp_path, monkeypatch,
                                                                    capsys):
    """train_dreambooth.py's main under run_cli, as `__main__` runs it, with a kohya writer that gets
    the alphas wrong: the check catches it, the files leave the output folder, exit 2."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import train_dreambooth
    from adaprelora.training.dreambooth import trainer
    from adaprelora.training.errors import run_cli

    real = trainer.save_kohya_lora

    def wrong_alphas(*args, **kwargs):
        path = real(*args, **kwargs)
        with safe_open(path, framework="pt") as fh:
            header = fh.metadata()
        tensors = {k: v * 2 if k.endswith(".alpha") else v for k, v in load_file(path).items()}
        save_file(tensors, path, metadata=header)
        return path

    monkeypatch.setattr(trainer, "save_kohya_lora", wrong_alphas)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train_dreambooth.main(dreambooth_args(tiny_model, instance_dir, out, "--optimizer", "adamw",
                                                              "--learning_rate", "1e-2", "--max_train_steps", "2")))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "export check FAILED" in errors[0] and "kohya file MISMATCH" in errors[0], errors
    assert_nothing_finished(out, DREAMBOOTH_FINISHED)
    aside = out / "export-check-failed"
    assert {p.name for p in aside.iterdir()} == {"pytorch_lora_weights.safetensors", "out.safetensors", "README.md"}


# ------------------------------------------------------------------------------------------------
# Output folders that are files, or lie under one; files removed mid-run
# ------------------------------------------------------------------------------------------------
def test_dreambooth_output_dir_that_is_a_file(launch, tiny_model, instance_dir, tmp_path):
    (tmp_path / "taken").write_text("a file")
    proc = launch(dreambooth_args(tiny_model, instance_dir, tmp_path / "taken"), expect_ok=False)
    assert_one_error(proc, "--output_dir", "is a file, not a folder", code=LAUNCH_FAILED)
    assert (tmp_path / "taken").read_text() == "a file"


def test_llm_output_dir_under_a_file(tiny_lm, tmp_path):
    (tmp_path / "taken").write_text("a file")
    train = write_jsonl(tmp_path / "train.jsonl", sst2_rows(8))
    proc = run_llm(llm_args(tiny_lm, train, tmp_path / "taken" / "run" / "out"), tmp_path)
    assert_one_error(proc, "--output_dir", "lies under", "which is a file, not a folder")


def test_output_folder_checks(tmp_path):
    from adaprelora.training.checkpoints import check_output_dir

    file = tmp_path / "f"
    file.write_text("x")
    check_output_dir(str(tmp_path / "new" / "deeper"))  # to be created: fine
    check_output_dir(str(tmp_path))
    for path, message in [(file, "is a file, not a folder"), (file / "a" / "b", "lies under"),
                          ("", "must name a folder"), ("  ", "must name a folder")]:
        with pytest.raises(UserError, match=f"^--class_data_dir.*{message}"):
            check_output_dir(str(path), "--class_data_dir")


def test_dreambooth_class_and_instance_folders_that_are_files(tiny_model, instance_dir, tmp_path):
    from adaprelora.training.dreambooth import TrainConfig

    (tmp_path / "taken").write_text("a file")
    base = dict(pretrained_model_name_or_path=tiny_model, instance_data_dir=instance_dir, instance_prompt="sks",
                output_dir=str(tmp_path / "out"), report_to="none")
    with pytest.raises(UserError, match="^--class_data_dir: .* lies under .*which is a file, not a folder"):
        TrainConfig(**base, with_prior_preservation=True, class_prompt="a toy",
                    class_data_dir=str(tmp_path / "taken" / "class")).validate()
    with pytest.raises(UserError, match="^--instance_data_dir: folder .* is a file, not a folder"):
        TrainConfig(**{**base, "instance_data_dir": str(tmp_path / "taken")}).validate()


def test_a_file_error_during_a_run_is_one_line(capsys):
    from adaprelora.training.errors import run_cli

    def removed_mid_run():
        open("/nonexistent-output-folder/loss_log.jsonl", "a")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(removed_mid_run)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: No such file or directory: /nonexistent-output-folder/loss_log.jsonl"


# ------------------------------------------------------------------------------------------------
# LLM data: nulls, empty files, labels, parser noise; the datasets cache
# ------------------------------------------------------------------------------------------------
LLM_DATA_CASES = {
    "null text": ([{"sentence": "good", "label": 1}, {"sentence": None, "label": 0}],
                  ["row 2", "column 'sentence' must hold text", "found null"]),
    "empty file": ("", ["the file is empty"]),
    "half label": ([{"sentence": "good", "label": 0}, {"sentence": "bad", "label": 0.5}],
                   ["row 2", "integer class id in 0..1", "found 0.5"]),
    "broken json": ('{"sentence": "good", "label": 0}\n{"sentence": "bad", "label"\n',
                    ["could not be read as json", "JSON parse error"]),
}


@pytest.mark.parametrize("case", list(LLM_DATA_CASES))
def test_llm_bad_data_is_one_line_naming_file_and_row(case, tiny_lm, tmp_path):
    rows, needles = LLM_DATA_CASES[case]
    path = tmp_path / "data.jsonl"
    if isinstance(rows, str):
        path.write_text(rows)
    else:
        write_jsonl(path, rows)
    out = tmp_path / "out"
    proc = run_llm(llm_args(tiny_lm, str(path), out), tmp_path)
    assert_one_error(proc, "data.jsonl", *needles)
    assert_nothing_finished(out, LLM_FINISHED)


def test_label_and_text_checks_report_the_value_as_written():
    from adaprelora.training.llm import get_task
    from adaprelora.training.llm.tasks import check_labels, check_texts

    sst2, stsb, gsm8k = get_task("glue:sst2"), get_task("glue:stsb"), get_task("gsm8k")
    check_labels([0, 1, 1.0, 0.0], sst2, where="f")  # whole floats: a JSON column with one float in it
    for labels, shown in [([0, 0.5], "0.5"), ([1, None], "null"), ([True], "true"), ([0, 2], "2"),
                          ([float("nan")], "nan"), (["1"], "'1'")]:
        with pytest.raises(UserError, match=f"f: row {len(labels)}: column 'label' .* found {shown}$"):
            check_labels(labels, sst2, where="f")
    with pytest.raises(UserError, match="found null"):
        check_labels([0.5, None], stsb, where="f")
    check_texts({"question": ["q"], "answer": ["a"]}, gsm8k, where="f")
    for column, values, shown in [("question", ["q", None], "null"), ("answer", ["a", 3], "3")]:
        data = {"question": ["q", "q"], "answer": ["a", "a"], column: values}
        with pytest.raises(UserError, match=f"f: row 2: column '{column}' must hold text for gsm8k, found {shown}"):
            check_texts(data, gsm8k, where="f")


def test_llm_keeps_its_datasets_cache_in_the_output_folder(tiny_lm, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    train = write_jsonl(tmp_path / "train.jsonl", sst2_rows(8))
    out = tmp_path / "out"
    proc = run_llm(llm_args(tiny_lm, train, out, "--max_steps", "1"), tmp_path, home=home)
    assert proc.returncode == 0, proc.stderr
    assert not list(home.rglob("*")), sorted(str(p) for p in home.rglob("*"))[:5]
    assert (out / "datasets_cache").is_dir() and list((out / "datasets_cache").rglob("*.arrow"))
    assert (out / "metrics.json").is_file()


# ------------------------------------------------------------------------------------------------
# Seeds beyond what the libraries take
# ------------------------------------------------------------------------------------------------
def test_llm_seed_beyond_64_bits(tiny_lm, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sst2_rows(8))
    seed = str(2**70)
    proc = run_llm(llm_args(tiny_lm, train, tmp_path / "out", "--seed", seed), tmp_path)
    assert_one_error(proc, f"--seed must be a whole number from 0 to {MAX_SEED}, got {seed}")
    assert not (tmp_path / "out").exists()


def test_seed_range():
    from adaprelora.training.errors import check_seed

    for ok in (None, 0, 42, MAX_SEED):
        check_seed(ok)
    for bad in (-1, MAX_SEED + 1, 2**64, 2**70, True):
        with pytest.raises(UserError, match="--seed must be a whole number from 0 to"):
            check_seed(bad)


# ------------------------------------------------------------------------------------------------
# Image modes and unreadable images
# ------------------------------------------------------------------------------------------------
def test_image_modes_become_the_right_rgb_pixels(tmp_path):
    from adaprelora.training.dreambooth.data import UnsupportedImage, load_rgb

    # 16-bit grayscale PNG: scaled 65535 -> 255 (float64 reference), not clipped to white.
    gray16 = np.random.default_rng(0).integers(0, 65536, (24, 32), dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(load_rgb(str(tmp_path / "g16.png")))
    expected = np.round(gray16.astype(np.float64) * 255.0 / 65535.0)
    assert rgb.shape == (24, 32, 3) and np.abs(rgb[..., 0] - expected).max() <= 0.5
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert (rgb == 255).mean() < 0.01
    # 32-bit integer pixels in 16-bit range are scaled the same way; beyond it, refused.
    from adaprelora.training.dreambooth.data import _to_8bit

    as_i = _to_8bit(Image.fromarray(gray16.astype(np.int32), mode="I"))
    assert np.abs(np.asarray(as_i) - expected).max() <= 0.5
    with pytest.raises(UnsupportedImage, match="outside 0..65535"):
        _to_8bit(Image.fromarray(np.full((4, 4), 70000, np.int32), mode="I"))
    # Floating-point pixels: refused, with the mode named.
    with pytest.raises(UnsupportedImage, match="mode F"):
        _to_8bit(Image.new("F", (4, 4), 0.5))
    # Palette with a transparent index, LA and premultiplied modes: flattened on white.
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    pixels = np.asarray(load_rgb(str(tmp_path / "p.png")))
    assert tuple(pixels[0, 0]) == (0, 0, 255) and tuple(pixels[1, 1]) == (255, 255, 255)
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    assert (np.asarray(load_rgb(str(tmp_path / "la.png"))) == 255).all()
    Image.new("LA", (4, 4), (40, 255)).save(tmp_path / "la-opaque.png")
    assert (np.asarray(load_rgb(str(tmp_path / "la-opaque.png"))) == 40).all()
    # CMYK JPEG: cyan-free full magenta and yellow is red.
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    r, g, b = np.asarray(load_rgb(str(tmp_path / "c.jpg"))).reshape(-1, 3).mean(0)
    assert r > 240 and g < 15 and b < 15


def test_an_image_folder_with_nothing_usable_names_the_file_and_why(launch, tiny_model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    # A floating-point TIFF under a .png name: PIL opens it by content, the loader must refuse it.
    Image.new("F", (16, 16), 0.25).save(folder / "depth.png", format="TIFF")
    (folder / "zz-broken.png").write_bytes(b"not an image")
    proc = launch(dreambooth_args(tiny_model, folder, tmp_path / "out"), expect_ok=False)
    assert_one_error(proc, "no usable image", "depth.png", "floating-point pixels (mode F)", "and 1 more",
                     code=LAUNCH_FAILED)
    assert not (tmp_path / "out").exists()


def test_unreadable_image_reasons(tmp_path):
    from adaprelora.training.dreambooth.data import scan_instance_images

    (tmp_path / "a.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"a\.png: not an image PIL can decode"):
        scan_instance_images(folder=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Optimizer arguments
# ------------------------------------------------------------------------------------------------
def test_malformed_optimizer_args_name_key_value_and_form(launch, tiny_model, instance_dir, tmp_path):
    proc = launch(dreambooth_args(tiny_model, instance_dir, tmp_path / "out", "--optimizer_args", "betas=0.9"),
                  expect_ok=False)
    assert_one_error(proc, "--optimizer_args betas=0.9", "expected a tuple of 2 numbers", "betas=(0.9,0.999)",
                     code=LAUNCH_FAILED)


def test_llm_malformed_optimizer_args(tiny_lm, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sst2_rows(8))
    proc = run_llm(llm_args(tiny_lm, train, tmp_path / "out", "--optimizer", "adamw", "--optimizer_args",
                            "weight_decay=abc"), tmp_path)
    assert_one_error(proc, "--optimizer_args weight_decay='abc'", "expected a finite number", "weight_decay=0.01")


def test_optimizer_args_checks():
    from adaprelora.training.options import check_optimizer_args, parse_optimizer_args

    def check(name, *items):
        check_optimizer_args(name, parse_optimizer_args(items))

    check("adaprelora", "betas=(0.9,0.99)", "weight_decay=0.1", "variant=sgd", "clip_threshold=None", "stats=tangent")
    check("adamw", "amsgrad=True", "eps=1e-6")
    check("loraplus", "loraplus_lr_ratio=4")
    check("adafactor", "beta1=0.9", "eps=(1e-30,1e-3)")
    for name, items, message in [
        ("adamw", ["betas=0.9"], r"betas=0\.9: expected a tuple of 2 numbers .* e\.g\. betas=\(0\.9,0\.999\)"),
        ("adamw", ["betas=(0.9,0.99,0.999)"], r"betas=\(0\.9, 0\.99, 0\.999\): expected a tuple of 2"),
        ("adaprelora", ["betas=[0.9 0.99]"], r"betas='\[0\.9 0\.99\]': expected a tuple"),
        ("adamw", ["weight_decay=abc"], "weight_decay='abc': expected a finite number"),
        ("adamw", ["eps=1e999"], "eps=inf: expected a finite number"),
        ("adamw", ["amsgrad=1"], "amsgrad=1: expected True or False"),
        ("adaprelora", ["variant=3"], "variant=3: expected text"),
        ("adamw", ["momentum=0.9"], "momentum=0.9: adamw takes no argument 'momentum'; it takes: amsgrad, betas"),
    ]:
        with pytest.raises(UserError, match=f"^--optimizer_args {message}"):
            check(name, *items)


def test_rank_is_read_from_mismatched_lora_shapes():
    from adaprelora.training.checkpoints import lora_ranks

    assert lora_ranks("unet.down.lora_A.default.weight", (4, 32), (8, 32)) == (4, 8)
    assert lora_ranks("model.layers.0.q_proj.lora_B.default.weight", (64, 8), (64, 16)) == (8, 16)
    assert lora_ranks("text_encoder.q_proj.lora_linear_layer.down.weight", (4, 32), (2, 32)) == (4, 2)
    assert lora_ranks("unet.lora_A.weight", (4, 32), (4, 32)) is None  # same shape
    assert lora_ranks("unet.lora_A.weight", (4, 32), (8, 64)) is None  # not the rank alone
    assert lora_ranks("classifier.weight", (2, 32), (3, 32)) is None
