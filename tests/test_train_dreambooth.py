"""train_dreambooth.py as users run it (`accelerate launch` in a subprocess) on a tiny SD pipeline,
plus in-process checks of `train()` for what a subprocess cannot show cheaply.

Subprocesses (each costs a few seconds of start-up) are kept few: one unet-only run with
checkpoints and validation, one resume of it, one text-encoder + prior-preservation run, and the
bad-input cases.
"""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from adaprelora import available_optimizers
from adaprelora.training.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "a photo of sks toy on a red table"


# ------------------------------------------------------------------------------------------------
# Fixtures (tiny_sd, launch and dreambooth_args are tests/conftest.py's)
# ------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_instance_images(folder: Path) -> None:
    """Three usable images in three formats and shapes, one caption file, one broken file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / "img0.png")
    (folder / "img0.txt").write_text(CAPTION + "\n")
    jpeg = Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    jpeg.save(folder / "img1.jpg", exif=exif)
    rgba = rng.integers(0, 255, (36, 36, 4), dtype=np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba, mode="RGBA").save(folder / "img2.webp")
    (folder / "broken.png").write_bytes(b"this is not a PNG")
    (folder / "notes.md").write_text("not an image, not a caption")


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> str:
    """This module's own (over tests/conftest.py's): its tests read formats, EXIF, alpha, a caption, a broken file."""
    folder = tmp_path_factory.mktemp("instance") / "toy"
    _write_instance_images(folder)
    return str(folder)


# Run A: unet only, AdaPreLoRA, cosine schedule, checkpoints every 2 steps keeping 2, validation
# images at step 3 and at the end.
RUN_A_ARGS = [
    "--optimizer", "adaprelora", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--lr_scheduler", "cosine",
    "--lr_warmup_steps", "1", "--learning_rate", "1e-3", "--validation_prompt", "sks toy in the snow",
    "--num_validation_images", "1", "--validation_steps", "3", "--validation_inference_steps", "2",
]


@pytest.fixture(scope="module")
def run_a(launch, dreambooth_args, tiny_sd, instance_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run-a") / "toy-lora"
    proc = launch(dreambooth_args(tiny_sd, instance_dir, out, 6) + RUN_A_ARGS)
    return out, proc


@pytest.fixture(scope="module")
def run_c(launch, dreambooth_args, tiny_sd, instance_dir, tmp_path_factory):
    """Text encoder + prior preservation (class images generated), alpha != rank, named output."""
    root = tmp_path_factory.mktemp("run-c")
    out, class_dir = root / "out", root / "class"
    proc = launch(dreambooth_args(tiny_sd, instance_dir, out, 2) + [
        "--train_text_encoder", "--with_prior_preservation", "--class_data_dir", str(class_dir),
        "--class_prompt", "a photo of a toy", "--num_class_images", "2", "--sample_batch_size", "2",
        "--class_inference_steps", "2",
        "--rank", "4", "--lora_alpha", "8", "--output_name", "sks_toy", "--optimizer", "adamw",
        "--learning_rate", "1e-2", "--report_to", "none",
    ])
    return out, class_dir, proc


def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def _fresh_pipeline(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe) -> np.ndarray:
    return pipe("a photo of sks toy", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


# ------------------------------------------------------------------------------------------------
# Subprocess runs
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_unet_only_run_outputs_checkpoints_and_samples(run_a):
    out, proc = run_a
    # Rotation: checkpoints at 2, 4, 6 with a limit of 2 leave exactly the last two, no temp folders.
    assert {p.name for p in out.iterdir() if p.name.startswith("checkpoint-")} == {"checkpoint-4", "checkpoint-6"}
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]

    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert weights and all("lora" in k and k.startswith("unet.") for k in weights)
    kohya = load_file(str(out / "toy-lora.safetensors"))  # default output name: the folder's name
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in kohya)
    assert len(kohya) == len(weights) // 2 * 3  # down, up and alpha per module
    for path in (out / "pytorch_lora_weights.safetensors", out / "toy-lora.safetensors"):
        meta = _metadata(path)
        assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "6"
        assert "adaprelora" in meta["ss_optimizer"] and meta["ss_lr_scheduler"] == "cosine"

    samples = sorted(p.name for p in (out / "validation").iterdir())
    assert samples == ["step-000003-prompt0-0.png", "step-000006-prompt0-0.png"]
    card = (out / "README.md").read_text()
    assert "a photo of sks toy" in card and "validation/step-000006-prompt0-0.png" in card
    assert (out / "logs").is_dir()  # tensorboard, the default tracker

    assert "broken.png" in proc.stderr and "Traceback" not in proc.stderr
    final = proc.stdout.strip().splitlines()[-1]
    assert "pytorch_lora_weights.safetensors" in final and "toy-lora.safetensors" in final
    assert "wall time" in final and "peak memory" in final
    assert "verified: diffusers file ok, kohya file ok (max diff" in final, final


@pytest.mark.slow
def test_resume_continues_steps_and_restores_optimizer_state(run_a, launch, dreambooth_args, tiny_sd, instance_dir,
                                                             tmp_path):
    out_a, _ = run_a
    out_b = tmp_path / "toy-lora"
    out_b.mkdir()
    shutil.copytree(out_a / "checkpoint-4", out_b / "checkpoint-4")
    proc = launch(dreambooth_args(tiny_sd, instance_dir, out_b, 6) + RUN_A_ARGS
                  + ["--resume_from_checkpoint", "latest"])
    assert "resumed from" in proc.stderr and "at step 4" in proc.stderr
    assert {p.name for p in out_b.iterdir() if p.name.startswith("checkpoint-")} == {"checkpoint-4", "checkpoint-6"}
    assert _metadata(out_b / "pytorch_lora_weights.safetensors")["ss_steps"] == "6"

    # Steps 5 and 6 after the resume match the uninterrupted run: same LoRA weights and the same
    # optimizer state (AdaPreLoRA's accumulators), which needs the weights, optimizer state,
    # cosine scheduler, RNG and data order all restored.
    opt_a = torch.load(out_a / "checkpoint-6" / "optimizer.bin", weights_only=False)
    opt_b = torch.load(out_b / "checkpoint-6" / "optimizer.bin", weights_only=False)
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    compared = 0
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                torch.testing.assert_close(opt_b["state"][index][name], value, rtol=1e-5, atol=1e-7)
                compared += 1
    assert compared > 0
    sched_a = torch.load(out_a / "checkpoint-6" / "scheduler.bin", weights_only=False)
    sched_b = torch.load(out_b / "checkpoint-6" / "scheduler.bin", weights_only=False)
    assert sched_a["last_epoch"] == sched_b["last_epoch"] == 6
    w_a = load_file(str(out_a / "checkpoint-6" / "pytorch_lora_weights.safetensors"))
    w_b = load_file(str(out_b / "checkpoint-6" / "pytorch_lora_weights.safetensors"))
    for key in w_a:
        torch.testing.assert_close(w_b[key], w_a[key], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_the_cli_trains_with_prodigy_and_names_it_in_the_metadata(launch, dreambooth_args, tiny_sd, instance_dir,
                                                                   tmp_path):
    out = tmp_path / "prodigy-lora"
    launch(dreambooth_args(tiny_sd, instance_dir, out, 2) + ["--optimizer", "prodigy", "--learning_rate", "1.0",
                                                             "--report_to", "none"])
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().max() > 0 for k, v in weights.items() if ".up." in k or "lora_B" in k), "B never moved"
    meta = _metadata(out / "pytorch_lora_weights.safetensors")
    assert "prodigy" in meta["ss_optimizer"] and meta["ss_steps"] == "2"


@pytest.mark.slow
def test_text_encoder_prior_preservation_and_reload(run_c, tiny_sd):
    out, class_dir, proc = run_c
    assert sorted(p.suffix for p in class_dir.iterdir()) == [".png", ".png"]
    assert "class image" in proc.stderr

    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert all("lora" in k and k.startswith(("unet.", "text_encoder.")) for k in weights)
    assert any(k.startswith("text_encoder.") for k in weights) and any(k.startswith("unet.") for k in weights)
    kohya = load_file(str(out / "sks_toy.safetensors"))
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in kohya)
    assert all(float(v) == 8.0 for k, v in kohya.items() if k.endswith(".alpha"))
    assert _metadata(out / "sks_toy.safetensors")["ss_network_alpha"] == "8.0"
    final = proc.stdout.strip().splitlines()[-1]
    assert "verified: diffusers file ok, kohya file ok (max diff" in final, final

    # Reloading the diffusers file changes the output; the kohya file (read by diffusers' own
    # kohya converter) gives the same model as the diffusers file.
    base = _generate(_fresh_pipeline(tiny_sd))
    pipe = _fresh_pipeline(tiny_sd)
    pipe.load_lora_weights(str(out))
    with_lora = _generate(pipe)
    assert np.abs(with_lora - base).max() > 1e-3
    pipe_k = _fresh_pipeline(tiny_sd)
    pipe_k.load_lora_weights(str(out), weight_name="sks_toy.safetensors")
    np.testing.assert_allclose(_generate(pipe_k), with_lora, atol=1e-5)


@pytest.mark.slow
def test_kohya_file_converts_back_to_the_same_weights(run_c, tiny_sd):
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig

    from adaprelora.training.dreambooth.export import (
        TEXT_ENCODER_TARGET_MODULES,
        UNET_TARGET_MODULES,
        kohya_to_peft,
        load_kohya_lora,
        peft_state_dict,
    )

    out, _, _ = run_c
    pipe = _fresh_pipeline(tiny_sd)
    kohya = load_file(str(out / "sks_toy.safetensors"))
    unet_sd, te_sd = kohya_to_peft(kohya, pipe.unet, pipe.text_encoder)
    diffusers_sd = load_file(str(out / "pytorch_lora_weights.safetensors"))
    expected_unet = convert_unet_state_dict_to_peft(
        {k[len("unet."):]: v for k, v in diffusers_sd.items() if k.startswith("unet.")})
    assert unet_sd.keys() == expected_unet.keys()
    for key, value in expected_unet.items():
        assert torch.equal(unet_sd[key], value), key
    assert len(te_sd) == sum(k.startswith("text_encoder.") for k in diffusers_sd)

    # Loading into adapters of the same shape reproduces the trained tensors exactly.
    common = dict(r=4, lora_alpha=8, init_lora_weights=False)
    pipe.unet.add_adapter(LoraConfig(target_modules=UNET_TARGET_MODULES, **common))
    pipe.text_encoder.add_adapter(LoraConfig(target_modules=TEXT_ENCODER_TARGET_MODULES, **common))
    loaded = load_kohya_lora(str(out / "sks_toy.safetensors"), pipe.unet, pipe.text_encoder)
    assert len(loaded) == len(kohya) // 3
    for key, value in peft_state_dict(pipe.unet).items():
        assert torch.equal(value, expected_unet[key]), key


BAD_INPUTS = {
    "missing folder": (["--instance_data_dir", "{tmp}/nope"], "nope"),
    "empty folder": (["--instance_data_dir", "{tmp}/empty"], "empty"),
    "no usable image": (["--instance_data_dir", "{tmp}/broken"], "broken"),
    "missing prompt": (["--instance_data_dir", "{instance}", "--instance_prompt", ""], "--instance_prompt"),
    "unknown optimizer": (["--instance_data_dir", "{instance}", "--optimizer", "adafactorish"], "adafactorish"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.slow
def test_bad_input_is_one_clear_line(case, launch, tiny_sd, instance_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"garbage")
    (tmp_path / "broken" / "b.webp").write_bytes(b"")
    args, expected = BAD_INPUTS[case]
    args = [a.format(tmp=tmp_path, instance=instance_dir) for a in args]
    base = ["--pretrained_model_name_or_path", tiny_sd, "--output_dir", str(tmp_path / "out"),
            "--resolution", "32", "--max_train_steps", "1", "--instance_prompt", "a photo of sks toy"]
    proc = launch(base + args, expect_ok=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


# ------------------------------------------------------------------------------------------------
# In-process: train() as the app drives it
# ------------------------------------------------------------------------------------------------
def _config(tiny_sd, instance_dir, output_dir, **kw):
    from adaprelora.training.dreambooth import TrainConfig

    base = dict(pretrained_model_name_or_path=tiny_sd, instance_data_dir=instance_dir,
                instance_prompt="a photo of sks toy", output_dir=str(output_dir), resolution=32,
                train_batch_size=1, max_train_steps=1, seed=0, report_to="none", learning_rate=1e-3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("name", available_optimizers())
@pytest.mark.slow
def test_every_optimizer_trains_one_step(name, tiny_sd, instance_dir, tmp_path):
    from adaprelora.training.dreambooth import train

    # AdaPreLoRA also under fp16 autocast, LoRA kept fp32 (accelerate uses no loss scaler on CPU;
    # attach_grad_scaler's path runs on CUDA only).
    precision = "fp16" if name == "adaprelora" else "no"
    events = list(train(_config(tiny_sd, instance_dir, tmp_path, optimizer=name, train_text_encoder=True,
                                mixed_precision=precision)))
    steps = [e for e in events if e.loss is not None]
    assert len(steps) == 1 and np.isfinite(steps[0].loss) and steps[0].lr > 0
    last = events[-1]
    assert last.done and not last.stopped and last.step == 1
    weights = load_file(last.outputs["diffusers"])
    # B starts at zero: after one step it has moved, in both models.
    for prefix in ("unet.", "text_encoder."):
        ups = [v for k, v in weights.items() if k.startswith(prefix) and ".up." in k]
        assert ups and any(v.abs().max() > 0 for v in ups), prefix
    assert os.path.isfile(last.outputs["kohya"])
    assert {v.dtype for v in weights.values()} == {torch.float32}


@pytest.mark.slow
def test_captions_images_list_mixed_precision_and_stop(tiny_sd, instance_dir, tmp_path, monkeypatch):
    """Captions (sidecar and explicit) reach the text encoder; LoRA stays fp32 under bf16; a stop
    request ends the run after the current step with a checkpoint and the output files."""
    from adaprelora.training import dreambooth

    seen: list[str] = []
    original = dreambooth._DreamBoothRun._encode_prompts

    def spy(self, prompts):
        seen.extend(prompts)
        return original(self, prompts)

    monkeypatch.setattr(dreambooth._DreamBoothRun, "_encode_prompts", spy)
    folder = Path(instance_dir)
    images = [str(folder / "img0.png"), str(folder / "img1.jpg")]
    stop = threading.Event()
    config = _config(tiny_sd, None, tmp_path / "out", instance_images=images,
                     instance_captions={images[1]: "sks toy, studio light"}, max_train_steps=50,
                     train_batch_size=2, mixed_precision="bf16", checkpointing_steps=100)
    events = []
    for event in dreambooth.train(config, stop_event=stop):
        events.append(event)
        if event.loss is not None:
            stop.set()
    last = events[-1]
    assert last.done and last.stopped and last.step == 1 and last.max_steps == 50
    assert os.path.isdir(last.outputs["checkpoint"]) and last.outputs["checkpoint"].endswith("checkpoint-1")
    assert {CAPTION, "sks toy, studio light"} <= set(seen)
    assert "a photo of sks toy" not in seen  # every image here has its own caption
    weights = load_file(last.outputs["diffusers"])
    assert {v.dtype for v in weights.values()} == {torch.float32}
    assert _metadata(last.outputs["diffusers"])["ss_steps"] == "1"


@pytest.mark.slow
def test_training_options_run(tiny_sd, instance_dir, tmp_path):
    """Gradient checkpointing and accumulation, min-SNR, noise offset, LoRA dropout, a decaying
    schedule and several validation prompts together."""
    from adaprelora.training.dreambooth import train

    config = _config(tiny_sd, instance_dir, tmp_path, max_train_steps=2, train_text_encoder=True,
                     gradient_checkpointing=True, gradient_accumulation_steps=2, snr_gamma=5.0, noise_offset=0.1,
                     lora_dropout=0.1, lr_scheduler="linear", lr_warmup_steps=0,
                     validation_prompt=["sks toy", "sks toy on a beach"], num_validation_images=2,
                     validation_steps=1, validation_inference_steps=2)
    events = list(train(config))
    steps = [e for e in events if e.loss is not None]
    assert [e.step for e in steps] == [1, 2] and all(np.isfinite(e.loss) for e in steps)
    assert steps[0].lr > steps[1].lr  # linear decay
    assert len(steps[0].samples) == 4 and all(os.path.isfile(p) for p in steps[0].samples)
    assert len(events[-1].samples) == 4  # final samples, both prompts
    assert "step-000002-prompt1-1.png" in (tmp_path / "README.md").read_text()


def test_data_loading_exif_alpha_captions_and_crops(instance_dir):
    from adaprelora.training.dreambooth.data import DreamBoothDataset, load_rgb, preprocess, scan_instance_images

    records, warnings = scan_instance_images(instance_dir)
    assert [os.path.basename(r.path) for r in records] == ["img0.png", "img1.jpg", "img2.webp"]
    assert len(warnings) == 1 and "broken.png" in warnings[0]
    assert records[0].caption == CAPTION and records[1].caption is None
    assert load_rgb(records[1].path).size == (48, 40)  # stored 40 wide x 48 high, EXIF-rotated
    flat = np.asarray(load_rgb(records[2].path), dtype=np.float32)
    raw = np.asarray(Image.open(records[2].path).convert("RGBA"), dtype=np.float32)
    expected = raw[..., :3] * raw[..., 3:] / 255 + 255 * (1 - raw[..., 3:] / 255)
    assert np.abs(flat - expected).max() <= 2  # flattened on white
    img = load_rgb(records[0].path)
    centre = preprocess(img, 32, center_crop=True)
    assert centre.shape == (3, 32, 32) and centre.dtype == torch.float32
    assert -1.0 <= float(centre.min()) and float(centre.max()) <= 1.0
    dataset = DreamBoothDataset(records, "a photo of sks toy", 32, seed=3)
    first = dataset[0]["instance_pixel_values"]
    assert torch.equal(first, dataset[0]["instance_pixel_values"])  # seeded crops: reproducible
    assert dataset[1]["instance_prompt"] == "a photo of sks toy" and dataset[0]["instance_prompt"] == CAPTION


def test_captioned_class_images_train_with_their_own_captions(instance_dir, tmp_path):
    """kohya's captioned regularization images: a class image with a caption file is paired with
    that caption, the others with --class_prompt."""
    from adaprelora.training.dreambooth.data import DreamBoothDataset, scan_class_images, scan_instance_images

    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(tmp_path / f"reg{i}.png")
    (tmp_path / "reg0.txt").write_text("a red circle on a blue background\n")
    (tmp_path / "reg2.png.txt").write_text("a white star on a black background")
    class_records, _ = scan_class_images(str(tmp_path))
    assert [r.caption for r in class_records] == ["a red circle on a blue background", None,
                                                  "a white star on a black background"]
    records, _ = scan_instance_images(instance_dir)
    dataset = DreamBoothDataset(records, "a photo of sks toy", 32, class_records=class_records,
                                class_prompt="a photo of a toy", seed=0)
    assert [dataset[i]["class_prompt"] for i in range(3)] == [
        "a red circle on a blue background", "a photo of a toy", "a white star on a black background"]


def test_caption_dropout_empties_prompts_at_the_rate_and_reproducibly(instance_dir, tmp_path):
    """--class_caption_dropout_rate trains a class image on the empty prompt (the unconditional
    prediction guidance subtracts) on about that share of items; --caption_dropout_rate does the
    same for instance images. Seeded per (seed, epoch, index): the same items every run, other
    ones the next epoch; the images themselves are unchanged."""
    from adaprelora.training.dreambooth.data import DreamBoothDataset, scan_class_images, scan_instance_images

    for i in range(400):
        Image.new("RGB", (8, 8), (i % 256, 80, 120)).save(tmp_path / f"reg{i}.png")
        (tmp_path / f"reg{i}.txt").write_text(f"caption {i}")
    class_records, _ = scan_class_images(str(tmp_path))
    records, _ = scan_instance_images(instance_dir)

    def prompts(epoch=0, **rates):
        dataset = DreamBoothDataset(records, "a photo of sks toy", 8, class_records=class_records,
                                    class_prompt="a photo of a toy", seed=5, **rates)
        dataset.set_epoch(epoch)
        items = [dataset[i] for i in range(len(dataset))]
        return [e["instance_prompt"] for e in items], [e["class_prompt"] for e in items], items

    plain_instance, plain_class, plain = prompts()
    assert "" not in plain_instance + plain_class
    inst, cls, dropped = prompts(class_caption_dropout_rate=0.25)
    assert inst == plain_instance  # the instance prompts are untouched
    empty = [i for i, p in enumerate(cls) if p == ""]
    assert 0.18 < len(empty) / len(cls) < 0.32, len(empty)
    assert all(cls[i] == plain_class[i] for i in range(len(cls)) if i not in empty)
    assert all(torch.equal(a["class_pixel_values"], b["class_pixel_values"]) for a, b in zip(plain, dropped))
    assert prompts(class_caption_dropout_rate=0.25)[1] == cls  # reproducible
    assert prompts(1, class_caption_dropout_rate=0.25)[1] != cls  # another draw next epoch
    inst, cls, _ = prompts(caption_dropout_rate=0.5)
    assert cls == plain_class and 0.35 < inst.count("") / len(inst) < 0.65
    assert prompts(caption_dropout_rate=1.0)[0] == [""] * len(inst)


@pytest.mark.slow
def test_dropped_captions_train_on_the_empty_prompt_with_cached_prompts(tiny_sd, instance_dir, tmp_path,
                                                                         monkeypatch):
    """With --cache_latents and a frozen text encoder the prompts are encoded once: the empty
    prompt of dropped captions must be among them, and reach the UNet."""
    from adaprelora.training import dreambooth

    calls: list[list[str]] = []
    original = dreambooth._DreamBoothRun._encode_prompts

    def spy(self, prompts):
        calls.append(list(prompts))
        return original(self, prompts)

    monkeypatch.setattr(dreambooth._DreamBoothRun, "_encode_prompts", spy)
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (90 * i, 80, 120)).save(class_dir / f"reg{i}.png")
        (class_dir / f"reg{i}.txt").write_text(f"a toy number {i}")
    config = _config(tiny_sd, instance_dir, tmp_path / "out", max_train_steps=3, train_batch_size=2,
                     cache_latents=True, center_crop=True, with_prior_preservation=True,
                     class_data_dir=str(class_dir), class_prompt="a toy", num_class_images=2,
                     class_caption_dropout_rate=1.0, skip_export_check=True)
    events = list(dreambooth.train(config))
    assert events[-1].done and os.path.isfile(events[-1].outputs["diffusers"])
    cached = [c[0] for c in calls if len(c) == 1]  # the cache encodes one prompt at a time
    batches = [c for c in calls if len(c) > 1]  # then each step's instance prompts, then its class ones
    assert "" in cached and len(batches) == 3, calls
    assert all(set(b[len(b) // 2:]) == {""} and "" not in b[:len(b) // 2] for b in batches), batches


def test_config_cross_field_errors_name_the_flags(tiny_sd, instance_dir, tmp_path):
    cases = {
        "--class_data_dir": dict(with_prior_preservation=True, class_prompt="a toy"),
        "--class_prompt": dict(with_prior_preservation=True, class_data_dir=str(tmp_path / "c")),
        "--resolution": dict(resolution=30),
        "--optimizer": dict(optimizer="nope"),
        "--output_name": dict(output_name="pytorch_lora_weights"),
        "--lora_dropout": dict(lora_dropout=1.5),
        "--class_caption_dropout_rate": dict(class_caption_dropout_rate=-0.1),
        "--caption_dropout_rate": dict(caption_dropout_rate=1.5),
    }
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        cases["--enable_xformers_memory_efficient_attention"] = dict(enable_xformers_memory_efficient_attention=True)
    for flag, kw in cases.items():
        with pytest.raises(UserError, match=flag):
            _config(tiny_sd, instance_dir, tmp_path, **kw).validate()


def test_parse_args_uses_diffusers_names_and_defaults():
    import train_dreambooth  # the repository root is on pytest's pythonpath
    args = train_dreambooth.parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
                                        "--optimizer_args", "weight_decay=0.01", "betas=(0.9,0.99)"])
    assert (args.learning_rate, args.rank, args.train_batch_size, args.resolution) == (5e-4, 4, 4, 512)
    assert (args.lr_scheduler, args.lr_warmup_steps, args.checkpointing_steps) == ("constant", 500, 500)
    assert (args.output_dir, args.num_validation_images, args.optimizer) == ("lora-dreambooth-model", 4, "adamw")
    assert args.optimizer_args == {"weight_decay": 0.01, "betas": (0.9, 0.99)}
    assert args.skip_export_check is False
    assert (args.caption_dropout_rate, args.class_caption_dropout_rate) == (0.0, 0.0)
    with pytest.raises(UserError, match="--optimizer"):
        train_dreambooth.parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
                                     "--optimizer", "sgd9000"])
    for name in ("prodigy", "adafactor", "schedule-free", "adamw8bit"):
        assert train_dreambooth.parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
                                            "--optimizer", name]).optimizer == name
