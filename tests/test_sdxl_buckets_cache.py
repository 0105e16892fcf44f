"""SDXL DreamBooth LoRA, aspect-ratio buckets and cached latents, on a tiny SDXL pipeline built in code.

Subprocess runs (`accelerate launch train_dreambooth.py`, as users run it) are shared between the
assertions through module-scoped fixtures: one SDXL run with the text encoders, buckets over three
image shapes and checkpoints; one resume of it; one prior-preservation run with latents cached on
disk; and the bad-input cases. What a subprocess cannot show cheaply (the first step's loss with
and without the cache, VAE calls, batch composition) is checked in-process.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_dreambooth.py")
PROMPT = "a photo of sks toy"
# (height, width): wide, tall, square, as the images of conftest's `instance_dir`.
SHAPES = [(64, 128), (128, 64), (80, 80)]
BUCKET_ARGS = ["--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16"]


# The models (tiny_sd, tiny_sdxl), instance_dir and the common flags (dreambooth_args) are tests/conftest.py's.
# SDXL, both text encoders, buckets, checkpoints every 2 steps, validation images 96 x 48.
RUN_ARGS = ["--report_to", "none", "--train_text_encoder", "--center_crop", *BUCKET_ARGS, "--checkpointing_steps", "2",
            "--learning_rate", "1e-2", "--optimizer", "adamw", "--validation_prompt", "sks toy on a beach",
            "--num_validation_images", "1", "--validation_steps", "100", "--validation_inference_steps", "2",
            "--validation_width", "96", "--validation_height", "48", "--output_name", "sks_xl"]


@pytest.fixture(scope="module")
def sdxl_run(launch, dreambooth_args, tiny_sdxl, instance_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl-run") / "out"
    return out, launch(dreambooth_args(tiny_sdxl, instance_dir, out, 4, resolution=64) + RUN_ARGS)


def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def _fresh_sdxl(model):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _unet_output(pipe) -> torch.Tensor:
    """The UNet's prediction on a fixed input, conditioned by the pipeline's own prompt encoding."""
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
    return pipe.unet(latents, torch.tensor([500]), embeds,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]


# ------------------------------------------------------------------------------------------------
# SDXL
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sdxl_run_writes_sdxl_keys_metadata_buckets_and_samples(sdxl_run):
    out, proc = sdxl_run
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert {k.split(".")[0] for k in weights} == {"unet", "text_encoder", "text_encoder_2"}
    kohya = load_file(str(out / "sks_xl.safetensors"))
    prefixes = {k.split("_blocks_")[0] if k.startswith("lora_unet_") else k[:9] for k in kohya}
    assert prefixes == {"lora_unet_input", "lora_unet_middle_block_1_transformer", "lora_unet_output",
                        "lora_te1_", "lora_te2_"}, prefixes
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in kohya)
    assert len(kohya) == len(weights) // 2 * 3
    for path in (out / "pytorch_lora_weights.safetensors", out / "sks_xl.safetensors"):
        meta = _metadata(path)
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    final = proc.stdout.strip().splitlines()[-1]
    assert "verified: diffusers file ok, kohya file ok" in final, final
    assert "Traceback" not in proc.stderr
    # The bucket table: three shapes, three buckets.
    assert "aspect-ratio buckets (3 used)" in proc.stderr
    for row in ("48 x 80", "64 x 64", "80 x 48"):
        assert row in proc.stderr, proc.stderr
    with Image.open(out / "validation" / "step-000004-prompt0-0.png") as img:
        assert img.size == (96, 48)


@pytest.mark.slow
def test_sdxl_files_load_in_diffusers_and_reproduce_the_trained_unet(sdxl_run, tiny_sdxl):
    """The final diffusers file, loaded with `load_lora_weights`, gives the UNet the trainer saved
    in checkpoint-4 (read back through the trainer's own checkpoint loader); the kohya file, read
    by diffusers' kohya converter, gives the same model."""
    from peft import LoraConfig

    from adaprelora.training.dreambooth.checkpoints import load_lora_checkpoint
    from adaprelora.training.dreambooth.export import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES

    out, _ = sdxl_run
    base = _unet_output(_fresh_sdxl(tiny_sdxl))

    trained = _fresh_sdxl(tiny_sdxl)
    common = dict(r=4, lora_alpha=4, init_lora_weights=False)
    trained.unet.add_adapter(LoraConfig(target_modules=UNET_TARGET_MODULES, **common))
    for encoder in (trained.text_encoder, trained.text_encoder_2):
        encoder.add_adapter(LoraConfig(target_modules=TEXT_ENCODER_TARGET_MODULES, **common))
    load_lora_checkpoint(str(out / "checkpoint-4"), trained.unet, [trained.text_encoder, trained.text_encoder_2])
    expected = _unet_output(trained)
    assert (expected - base).abs().max() > 1e-3, "the LoRA should change the UNet's output"

    for weight_name in ("pytorch_lora_weights.safetensors", "sks_xl.safetensors"):
        pipe = _fresh_sdxl(tiny_sdxl)
        pipe.load_lora_weights(str(out), weight_name=weight_name)
        torch.testing.assert_close(_unet_output(pipe), expected, rtol=1e-4, atol=1e-5, msg=weight_name)


@pytest.mark.slow
def test_sdxl_resume_with_buckets_equals_the_uninterrupted_run(sdxl_run, launch, dreambooth_args, tiny_sdxl,
                                                               instance_dir, tmp_path):
    out_a, _ = sdxl_run
    out_b = tmp_path / "out"
    out_b.mkdir()
    shutil.copytree(out_a / "checkpoint-2", out_b / "checkpoint-2")
    proc = launch(dreambooth_args(tiny_sdxl, instance_dir, out_b, 4, resolution=64) + RUN_ARGS
                  + ["--resume_from_checkpoint", "latest", "--skip_export_check"])
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    w_a = load_file(str(out_a / "checkpoint-4" / "pytorch_lora_weights.safetensors"))
    w_b = load_file(str(out_b / "checkpoint-4" / "pytorch_lora_weights.safetensors"))
    assert w_a.keys() == w_b.keys() and any(k.startswith("text_encoder_2.") for k in w_a)
    for key in w_a:
        torch.testing.assert_close(w_b[key], w_a[key], rtol=1e-5, atol=1e-7, msg=key)
    opt_a = torch.load(out_a / "checkpoint-4" / "optimizer.bin", weights_only=False)
    opt_b = torch.load(out_b / "checkpoint-4" / "optimizer.bin", weights_only=False)
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                torch.testing.assert_close(opt_b["state"][index][name], value, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_sdxl_prior_preservation_with_latents_cached_on_disk(launch, dreambooth_args, tiny_sdxl, instance_dir,
                                                             tmp_path):
    out, class_dir = tmp_path / "out", tmp_path / "class"
    args = dreambooth_args(tiny_sdxl, instance_dir, out, 2) + [
        "--report_to", "none", "--with_prior_preservation", "--class_data_dir", str(class_dir),
        "--class_prompt", "a photo of a toy",
        "--num_class_images", "2", "--sample_batch_size", "2", "--class_inference_steps", "2",
        "--cache_latents_to_disk", "--center_crop", "--crops_coords_top_left_h", "0"]
    proc = launch(args)
    assert sorted(p.suffix for p in class_dir.iterdir()) == [".png", ".png"]
    assert "cached latents: 5 encoded, 0 read from disk" in proc.stderr, proc.stderr
    assert len(list((out / "latent_cache").iterdir())) == 5  # 3 instance + 2 class images
    assert "verified: diffusers file ok, kohya file ok" in proc.stdout
    # A second run reads the cache instead of encoding again.
    proc = launch(args[:args.index("--output_dir") + 1] + [str(out)] + args[args.index("--output_dir") + 2:]
                  + ["--skip_export_check"])
    assert "cached latents: 0 encoded, 5 read from disk" in proc.stderr, proc.stderr


BAD_INPUTS = {
    "SDXL-only flag on SD 1.5": (["--crops_coords_top_left_w", "16"], "--crops_coords_top_left_w"),
    "cache with random flip": (["--cache_latents", "--center_crop", "--random_flip"], "--random_flip"),
    "cache with random crop": (["--cache_latents"], "--center_crop"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.slow
def test_bad_combinations_are_one_clear_line_and_exit_2(case, launch, dreambooth_args, tiny_sd, instance_dir, tmp_path):
    args, expected = BAD_INPUTS[case]
    proc = launch(dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", 1) + ["--report_to", "none"] + args,
                  expect_ok=False)
    assert proc.returncode != 0  # accelerate's launcher turns the script's exit 2 into its own 1
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr


def test_the_script_itself_exits_2_on_a_bad_combination(dreambooth_args, tiny_sd, instance_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = dreambooth_args(tiny_sd, instance_dir, tmp_path / "out", 1) + ["--report_to", "none", "--cache_latents",
                                                                          "--random_flip", "--center_crop"]
    proc = subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: --cache_latents encodes every image once, so it cannot be used with --random_flip (a new flip "
        "every step): drop one of the two"]


# ------------------------------------------------------------------------------------------------
# In-process: cached latents
# ------------------------------------------------------------------------------------------------
def _first_loss_and_vae_calls(model, instance_dir, out, monkeypatch, **kw):
    from diffusers import AutoencoderKL

    from adaprelora.training.dreambooth import TrainConfig, train

    calls = {"n": 0}
    original = AutoencoderKL.encode

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    config = TrainConfig(pretrained_model_name_or_path=model, instance_data_dir=instance_dir, instance_prompt=PROMPT,
                         output_dir=str(out), resolution=32, train_batch_size=1, max_train_steps=3, seed=0,
                         report_to="none", center_crop=True, skip_export_check=True, **kw)
    losses, calls_at_steps = [], []
    for event in train(config):
        if event.loss is not None:
            losses.append(event.loss)
            calls_at_steps.append(calls["n"])
    monkeypatch.setattr(AutoencoderKL, "encode", original)
    return losses, calls_at_steps, calls["n"]


@pytest.mark.parametrize("buckets", [False, True], ids=["square", "buckets"])
def test_cached_latents_give_the_same_losses_and_never_call_the_encoder_again(buckets, tiny_sdxl, instance_dir,
                                                                             tmp_path, monkeypatch):
    extra = dict(enable_bucket=True, min_bucket_reso=16, max_bucket_reso=64, bucket_reso_steps=16) if buckets else {}
    plain, plain_calls, _ = _first_loss_and_vae_calls(tiny_sdxl, instance_dir, tmp_path / "a", monkeypatch, **extra)
    cached, cached_calls, total = _first_loss_and_vae_calls(tiny_sdxl, instance_dir, tmp_path / "b", monkeypatch,
                                                            cache_latents=True, **extra)
    assert plain_calls == [1, 2, 3]  # uncached: the encoder runs every step
    assert cached_calls == [3, 3, 3] and total == 3, "one encode per image before training, none after"
    np.testing.assert_allclose(cached[0], plain[0], rtol=1e-5)
    np.testing.assert_allclose(cached, plain, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Buckets
# ------------------------------------------------------------------------------------------------
def test_buckets_are_multiples_of_the_step_within_the_pixel_budget():
    from adaprelora.training.dreambooth.buckets import make_buckets

    buckets = make_buckets(1024, 256, 2048, 64)
    assert {(1024, 1024), (1152, 896), (896, 1152), (1216, 832)} <= set(buckets)  # SDXL's usual ones
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 for w, h in buckets)
    assert all(256 <= min(w, h) and max(w, h) <= 2048 for w, h in buckets)
    assert len(set(buckets)) == len(buckets) and all((h, w) in buckets for w, h in buckets)


@pytest.mark.parametrize("height,width", SHAPES + [(300, 1000)])
def test_an_image_is_fitted_to_its_bucket_without_cropping_its_long_side_square(height, width):
    from adaprelora.training.dreambooth.buckets import bucket_for, fit_to_bucket, make_buckets

    buckets = make_buckets(64, 32, 128, 16)
    bucket = bucket_for((width, height), buckets, resolution=64, step=16)
    assert (bucket[0] >= bucket[1]) == (width >= height), "the bucket keeps the image's orientation"
    img = Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))
    pixels, original, (top, left) = fit_to_bucket(img, bucket, center_crop=True)
    assert pixels.shape == (3, bucket[1], bucket[0]) and original == (height, width)
    # What the crop removes, as a fraction of each side, is only the bucket's rounding remainder:
    scale = max(bucket[0] / width, bucket[1] / height)
    kept_w, kept_h = bucket[0] / (width * scale), bucket[1] / (height * scale)
    assert min(kept_w, kept_h) >= 0.75, (bucket, kept_w, kept_h)  # a square crop of 2:1 keeps 0.5
    assert (left == 0 or top == 0)


def test_no_upscale_keeps_small_images_at_their_own_size():
    from adaprelora.training.dreambooth.buckets import bucket_for

    assert bucket_for((40, 72), [], resolution=64, step=8, no_upscale=True) == (40, 72)
    w, h = bucket_for((400, 200), [], resolution=64, step=8, no_upscale=True)
    assert w % 8 == 0 and h % 8 == 0 and w * h <= 64 * 64 and w > h


def test_bucket_batches_hold_one_bucket_and_their_order_is_seeded_per_epoch(instance_dir):
    from adaprelora.training.dreambooth.config import TrainConfig
    from adaprelora.training.dreambooth.data import build_dataloader, scan_instance_images

    folder = Path(instance_dir)
    records, _ = scan_instance_images(files=[str(folder / f"img{i}.png") for i in (0, 1, 2, 0, 1, 2)])
    cfg = TrainConfig(resolution=64, train_batch_size=2, seed=5, center_crop=True, enable_bucket=True,
                      min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16, instance_prompt=PROMPT)
    dataset, loader, table = build_dataloader(cfg, records, [])
    assert "3 used" in table
    sampler = loader.batch_sampler
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(6))
        orders.append(batches)
        for indices, batch in zip(batches, iter(loader)):
            assert len({dataset.item_buckets[i] for i in indices}) == 1
            w, h = dataset.item_buckets[indices[0]]
            assert batch["pixel_values"].shape[-2:] == (h, w)
            assert len(batch["original_sizes"]) == len(indices)
    assert orders[0] == orders[2] and orders[0] != orders[1]


# ------------------------------------------------------------------------------------------------
# The app with an SDXL base model
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_app_names_the_family_and_generates_with_an_sdxl_lora(sdxl_run, tiny_sdxl, tiny_sd, tmp_path):
    from adaprelora.app.defaults import SDXL_PRESETS, TINY_PROFILE, profile_for
    from adaprelora.app.generate import BaseModel, GenerationRequest, generate_images
    from adaprelora.tiny_t2i import TINY_SD_DIR

    assert profile_for(TINY_SD_DIR) is TINY_PROFILE
    assert profile_for(tiny_sdxl).family == "SDXL" and profile_for(tiny_sdxl).presets is SDXL_PRESETS
    assert profile_for(tiny_sd).family == "Stable Diffusion 1.x"
    hub = profile_for("stabilityai/stable-diffusion-xl-base-1.0")
    assert hub.family == "SDXL" and hub.train.resolution == 1024
    base = BaseModel(tiny_sdxl, check_in_background=False)
    assert "(SDXL)" in base.status_markdown()
    out, _ = sdxl_run
    paths = generate_images(base, GenerationRequest(prompt=PROMPT, num_inference_steps=2, width=48, height=32),
                            str(out), str(tmp_path / "images"))
    with Image.open(paths[0]) as img:
        assert img.size == (48, 32)
