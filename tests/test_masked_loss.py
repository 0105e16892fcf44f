"""Masked loss (`--masked_loss --conditioning_data_dir`, `--alpha_mask`): the maths against a float64
reference, zero gradient from a masked-out half on a real UNet with LoRA, masks aligned with their
images through bucket resize, random crop and flip, one `accelerate launch` run with buckets, cached
latents on disk, prior preservation and min-SNR, and the bad inputs (one `error:` line, exit 2,
nothing written).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from adaprelora.training.dreambooth.config import TrainConfig
from adaprelora.training.dreambooth.loss import denoising_loss
from adaprelora.training.dreambooth.masks import LossMasks, find_loss_masks, masked_mse
from adaprelora.training.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a photo of sks toy"
BUCKET_ARGS = ["--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16"]


def half_masks(folder: Path, image_paths, side: str = "left") -> list[str]:
    """A mask per image (same stem, PNG, mode L): black on the `side` half, white on the other."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in image_paths:
        width, height = Image.open(image).size
        mask = np.full((height, width), 255, np.uint8)
        mask[:, : width // 2] = 0
        if side == "right":
            mask = mask[:, ::-1]
        path = folder / (Path(image).stem + ".png")
        Image.fromarray(np.ascontiguousarray(mask), mode="L").save(path)
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------------------------------------
# The maths: denoising_loss with masks against float64, with min-SNR and prior preservation
# ------------------------------------------------------------------------------------------------
class RecordingUNet(torch.nn.Module):
    """A 1x1 convolution in the UNet's calling convention that keeps its last prediction."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)
        self.pred = None

    def forward(self, x, timesteps, hidden, return_dict=False):
        self.pred = self.conv(x) + hidden.mean()
        return (self.pred,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_masked_denoising_loss_matches_float64_reference(prediction_type):
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    unet, bsz, (h, w), factor = RecordingUNet(), 3, (4, 6), 8
    latents = torch.randn(2 * bsz, 4, h, w)
    hidden = torch.randn(2 * bsz, 5, 8)
    masks = torch.randint(0, 256, (2 * bsz, 1, h * factor, w * factor), dtype=torch.uint8)
    masks[bsz:] = 255  # the class half (prior preservation) is unmasked, as the data loader gives it
    cfg = TrainConfig(snr_gamma=5.0, with_prior_preservation=True, prior_loss_weight=0.7)

    torch.manual_seed(123)
    loss = denoising_loss(cfg, scheduler, unet, latents, hidden, masks=masks)
    torch.manual_seed(123)  # the same draws, in denoising_loss's order: noise, then timesteps
    noise = torch.randn_like(latents).double()
    timesteps = torch.randint(0, 1000, (2 * bsz,))

    ac = scheduler.alphas_cumprod.double()[timesteps].view(-1, 1, 1, 1)
    x0 = latents.double()
    target = noise if prediction_type == "epsilon" else ac.sqrt() * noise - (1 - ac).sqrt() * x0
    # Each latent cell weighs the mean of the 8 x 8 pixels it covers, written out as blocks.
    cell = masks.double().view(2 * bsz, 1, h, factor, w, factor).mean(dim=(3, 5)) / 255
    per_image = ((unet.pred.detach().double() - target) ** 2 * cell).mean(dim=(1, 2, 3))
    snr = (ac / (1 - ac)).flatten()
    weight = snr.clamp(max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    per_image = per_image * weight
    expected = per_image[:bsz].mean() + 0.7 * per_image[bsz:].mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)

    # All-white masks are exactly the unmasked loss; a mask that is not renormalised (kohya's) halves it.
    torch.manual_seed(5)
    plain = denoising_loss(TrainConfig(), scheduler, unet, latents, hidden)
    torch.manual_seed(5)
    white = denoising_loss(TrainConfig(), scheduler, unet, latents, hidden, masks=torch.full_like(masks, 255))
    assert torch.equal(plain, white)
    half = torch.full_like(masks, 255)
    half[..., : w * factor // 2] = 0
    pred, tgt = torch.randn(2, 4, h, w), torch.randn(2, 4, h, w)
    left = ((pred - tgt) ** 2)[..., : w // 2].sum(dim=(1, 2, 3))
    torch.testing.assert_close(masked_mse(pred, tgt, half[:2]), masked_mse(pred, tgt) - left / (4 * h * w))


# ------------------------------------------------------------------------------------------------
# Zero gradient from the masked half: a real UNet with LoRA, perturbing the target there
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_unet(tiny_sd):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return unet


def _loss_and_grads(unet, inputs, target, masks):
    unet.zero_grad(set_to_none=True)
    pred = unet(*inputs, return_dict=False)[0]
    pred.retain_grad()
    loss = masked_mse(pred, target, masks).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    return loss.detach(), grads, pred.grad


@pytest.mark.slow
def test_a_masked_half_gives_exactly_zero_gradient_and_training_never_sees_it(lora_unet, tiny_sd):
    from adaprelora import create_optimizer

    unet = lora_unet
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    inputs = (latents, torch.tensor([10, 500]), torch.randn(2, 6, unet.config.cross_attention_dim, generator=gen))
    masks = torch.full((2, 1, 16, 16), 255, dtype=torch.uint8)  # pixel size: twice the latent (tiny VAE)
    masks[..., :8] = 0  # the left half of every image is ignored
    target = torch.randn(2, 4, 8, 8, generator=gen)
    other = target.clone()
    other[..., :4] = torch.randn(2, 4, 8, 4, generator=gen) * 10  # only the masked half differs

    loss, grads, pred_grad = _loss_and_grads(unet, inputs, target, masks)
    loss2, grads2, _ = _loss_and_grads(unet, inputs, other, masks)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(grads[n], grads2[n]) for n in grads)
    assert torch.count_nonzero(pred_grad[..., :4]) == 0 and torch.count_nonzero(pred_grad[..., 4:]) == pred_grad[
        ..., 4:].numel()
    assert sum(g.abs().sum() for g in grads.values()) > 0
    # Without the mask the same perturbation moves the loss and every LoRA gradient: the test can fail.
    plain, plain_grads, _ = _loss_and_grads(unet, inputs, target, None)
    plain2, plain_grads2, _ = _loss_and_grads(unet, inputs, other, None)
    assert plain2 > plain and not any(torch.equal(plain_grads[n], plain_grads2[n]) for n in plain_grads)

    # Training: the masked loss falls, and targets differing only in the masked half give the same LoRA.
    start = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}

    def train(tgt, steps=8):
        with torch.no_grad():
            for n, p in unet.named_parameters():
                if n in start:
                    p.copy_(start[n])
        optimizer = create_optimizer("adaprelora", unet, lr=1e-2)
        losses = []
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = masked_mse(unet(*inputs, return_dict=False)[0], tgt, masks).mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses, {n: p.detach().clone() for n, p in unet.named_parameters() if n in start}

    losses, weights = train(target)
    losses2, weights2 = train(other)
    assert losses[-1] < 0.9 * losses[0], losses
    assert losses == losses2 and all(torch.equal(weights[n], weights2[n]) for n in weights)
    assert any(not torch.equal(weights[n], start[n]) for n in weights)


# ------------------------------------------------------------------------------------------------
# Masks follow their images: bucket resize, random crop, flip; alpha masks; class images unmasked
# ------------------------------------------------------------------------------------------------
def _dataset(records, masks, interpolation="lanczos", class_records=None):
    from adaprelora.training.dreambooth.buckets import make_buckets
    from adaprelora.training.dreambooth.data import DreamBoothDataset

    return DreamBoothDataset(records, PROMPT, 64, center_crop=False, interpolation=interpolation, seed=3,
                             random_flip=True, buckets=make_buckets(64, 32, 128, 16), bucket_reso_steps=16,
                             class_records=class_records, class_prompt="a toy", masks=masks)


def test_masks_stay_aligned_with_their_images_through_bucket_resize_crop_and_flip(tmp_path, write_images):
    from adaprelora.training.dreambooth.data import ImageRecord, collate_fn

    images = write_images(tmp_path / "img", [(70, 150), (150, 70), (90, 90)])
    mask_dir = tmp_path / "masks"
    mask_dir.mkdir()
    for path in images:  # the mask is the image's red channel: aligned views give equal arrays
        Image.open(path).getchannel("R").save(mask_dir / (Path(path).stem + ".png"))
    records = [ImageRecord(p) for p in images]
    cfg = TrainConfig(masked_loss=True, conditioning_data_dir=str(mask_dir))
    masks, warnings = find_loss_masks(cfg, records)
    assert warnings == [] and set(masks.files) == set(images)
    classes = write_images(tmp_path / "class", [(64, 64)], prefix="c")
    dataset = _dataset(records, masks, class_records=[ImageRecord(classes[0])])
    flips, crops = set(), set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            example = dataset[index]
            pixels, mask = example["instance_pixel_values"], example["instance_mask"]
            assert mask.dtype == torch.uint8 and mask.shape == (1, *pixels.shape[1:])
            red = ((pixels[0] + 1) * 127.5).round().to(torch.uint8)
            assert torch.equal(red, mask[0]), (epoch, index)
            assert torch.all(example["class_mask"] == 255)  # class images: never masked
            crops.add((index, example["instance_crop_top_left"]))
            rng = random.Random(f"{dataset.seed}-{epoch}-{index}")
            flips.add(rng.random() < 0.5)
    assert flips == {True, False} and len(crops) > len(images)  # both flips and several crops were checked
    batch = collate_fn([dataset[0]], with_prior_preservation=True)
    assert batch["masks"].shape == (2, 1, *batch["pixel_values"].shape[-2:])

    # --alpha_mask: the alpha channel is the mask (nearest resampling keeps 0/255, so the flattened
    # picture, black where opaque and white where transparent, is exactly 255 - mask).
    rng = np.random.default_rng(0)
    rgba_dir = tmp_path / "rgba"
    rgba_dir.mkdir()
    paths = []
    for i, (h, w) in enumerate([(70, 150), (150, 70)]):
        alpha = (rng.random((h, w)) < 0.5).astype(np.uint8) * 255
        rgba = np.zeros((h, w, 4), np.uint8)
        rgba[..., 3] = alpha
        paths.append(str(rgba_dir / f"a{i}.png"))
        Image.fromarray(rgba, mode="RGBA").save(paths[-1])
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(rgba_dir / "opaque.jpg")
    records = [ImageRecord(p) for p in paths + [str(rgba_dir / "opaque.jpg")]]
    masks, warnings = find_loss_masks(TrainConfig(alpha_mask=True), records)
    assert len(warnings) == 1 and "1 of 3" in warnings[0] and "opaque.jpg" in warnings[0]
    dataset = _dataset(records, masks, interpolation="nearest")
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            example = dataset[index]
            red = ((example["instance_pixel_values"][0] + 1) * 127.5).round().to(torch.uint8)
            if index < 2:
                assert torch.equal(red, 255 - example["instance_mask"][0])
                assert 0 < example["instance_mask"].float().mean() < 255
            else:  # no alpha: trains whole
                assert torch.all(example["instance_mask"] == 255)


# ------------------------------------------------------------------------------------------------
# One real run: accelerate launch with mask files, buckets, latents cached on disk, prior
# preservation and min-SNR
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_masked_loss_run_with_buckets_cache_and_prior_preservation(launch, dreambooth_args, tiny_sd, instance_dir,
                                                                  write_images, tmp_path):
    from adaprelora.training.dreambooth.data import list_image_files

    images = list_image_files(instance_dir)
    mask_dir = tmp_path / "masks"
    half_masks(mask_dir, images)
    class_dir = tmp_path / "class"
    write_images(class_dir, [(64, 64), (64, 64)], prefix="class")
    out = tmp_path / "out"
    proc = launch(dreambooth_args(tiny_sd, instance_dir, out, 2, resolution=64) + [
        "--report_to", "none", "--masked_loss", "--conditioning_data_dir", str(mask_dir), *BUCKET_ARGS,
        "--center_crop", "--cache_latents_to_disk", "--with_prior_preservation", "--class_data_dir", str(class_dir),
        "--class_prompt", "a photo of a toy", "--num_class_images", "2", "--snr_gamma", "5",
        "--learning_rate", "1e-2", "--validation_steps", "100", "--num_validation_images", "0"], threads=2)
    assert "finished at step 2" in proc.stdout, proc.stdout + proc.stderr
    assert "verified: diffusers file ok, kohya file ok" in proc.stdout, proc.stdout
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    # The disk cache holds each view's mask beside its latents: instance masks black on their left
    # half, class masks all white (a class image is cached in the bucket of each instance image it
    # pairs with: 3 views); each mask is the latents' pixel size (the tiny VAE halves it).
    entries = sorted((out / "latent_cache").glob("*.safetensors"))
    assert len(entries) == 2 * len(images)
    halves = whites = 0
    for entry in entries:
        with safe_open(str(entry), framework="pt") as fh:
            params, mask = fh.get_tensor("latent_params"), fh.get_tensor("mask")
        assert mask.dtype == torch.uint8 and mask.shape == (1, params.shape[-2] * 2, params.shape[-1] * 2)
        width = mask.shape[-1]
        if torch.all(mask == 255):
            whites += 1
        else:
            assert torch.all(mask[..., : width // 2 - 1] == 0) and torch.all(mask[..., width // 2 + 1:] == 255)
            halves += 1
    assert (halves, whites) == (len(images), len(images))


# ------------------------------------------------------------------------------------------------
# Bad input: one error line, exit 2, nothing written
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def bad_masks(tmp_path, write_images):
    images = tmp_path / "images"
    write_images(images, [(32, 48), (40, 40)])
    good = tmp_path / "masks"
    half_masks(good, sorted(str(p) for p in images.iterdir()))
    missing = tmp_path / "missing"
    half_masks(missing, [str(images / "img0.png")])
    wrong = tmp_path / "wrong-size"
    half_masks(wrong, [str(images / "img0.png")])
    Image.new("L", (20, 40), 255).save(wrong / "img1.png")
    return images, {"good": good, "missing": missing, "wrong": wrong}


BAD_CASES = {
    "mask of another size": (["--masked_loss", "--conditioning_data_dir", "{wrong}"],
                             ["--conditioning_data_dir", "mask 'img1.png' is 20x40", "its image 'img1.png' is 40x40"]),
    "missing mask": (["--masked_loss", "--conditioning_data_dir", "{missing}"],
                     ["no mask for 1 of 2 instance image(s): 'img1.png'"]),
    "masked_loss without masks": (["--masked_loss"], ["--masked_loss needs --conditioning_data_dir", "--alpha_mask"]),
    "folder without masked_loss": (["--conditioning_data_dir", "{good}"], ["only --masked_loss uses", "add --masked_loss"]),
    "alpha_mask without alpha": (["--alpha_mask"], ["--alpha_mask: none of the 2 instance image(s) has an alpha"]),
    "alpha and folder": (["--masked_loss", "--alpha_mask", "--conditioning_data_dir", "{good}"], ["use one of the two"]),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_masks_are_one_error_line_exit_2_and_nothing_written(case, bad_masks, tmp_path, capsys):
    import train_dreambooth
    from adaprelora.training.errors import run_cli

    images, folders = bad_masks
    extra, needles = BAD_CASES[case]
    out = tmp_path / "out"
    args = ["--pretrained_model_name_or_path", str(tmp_path / "model-never-loaded"), "--instance_data_dir",
            str(images), "--instance_prompt", PROMPT, "--output_dir", str(out), "--report_to", "none",
            *[a.format(**folders) for a in extra]]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train_dreambooth.main(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not out.exists()


def test_mask_warnings_and_pairing(tmp_path, write_images):
    from adaprelora.training.dreambooth.data import ImageRecord

    images = write_images(tmp_path / "images", [(32, 32), (32, 32)])
    folder = tmp_path / "masks"
    half_masks(folder, images)
    Image.new("L", (32, 32), 0).save(folder / "img1.png")  # black everywhere
    Image.new("L", (8, 8), 255).save(folder / "stray.png")  # no image of that name
    masks, warnings = find_loss_masks(TrainConfig(masked_loss=True, conditioning_data_dir=str(folder)),
                                      [ImageRecord(p) for p in images])
    assert isinstance(masks, LossMasks) and masks.files == {p: str(folder / Path(p).name) for p in images}
    assert any("black everywhere" in w and "img1.png" in w for w in warnings)
    assert any("match no instance image" in w and "stray.png" in w for w in warnings)
    Image.new("L", (32, 32), 255).save(folder / "img0.jpg")
    with pytest.raises(UserError, match="2 mask files for image 'img0.png'"):
        find_loss_masks(TrainConfig(masked_loss=True, conditioning_data_dir=str(folder)),
                        [ImageRecord(p) for p in images])
    assert find_loss_masks(TrainConfig(), [ImageRecord(p) for p in images]) == (None, [])
    with pytest.raises(UserError, match="holds the training images themselves"):
        find_loss_masks(TrainConfig(masked_loss=True, conditioning_data_dir=str(tmp_path / "images")),
                        [ImageRecord(p) for p in images])
    os.remove(folder / "img0.jpg")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sdxl"])
def test_alpha_mask_run_brings_each_images_alpha_to_the_loss(model, request, tmp_path, monkeypatch):
    """`train()` with `alpha_mask`, SD and SDXL: RGBA PNGs whose left half is transparent reach the loss
    with masks black on the left and white on the right (the in-process twin of the command above)."""
    from adaprelora.training.dreambooth import train, trainer

    seen = []
    real = trainer.denoising_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("masks"))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "denoising_loss", spy)
    folder = tmp_path / "cutouts"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        rgba = rng.integers(0, 255, (48, 48, 4), dtype=np.uint8)
        rgba[..., 3] = 255
        rgba[:, :24, 3] = 0
        Image.fromarray(rgba, mode="RGBA").save(folder / f"cut{i}.png")
    config = TrainConfig(pretrained_model_name_or_path=request.getfixturevalue(model), instance_data_dir=str(folder), instance_prompt=PROMPT,
                         output_dir=str(tmp_path / "out"), resolution=32, train_batch_size=2, max_train_steps=2,
                         seed=0, mixed_precision="no", report_to="none", alpha_mask=True, center_crop=True,
                         optimizer="adamw", learning_rate=1e-3, skip_export_check=True, num_validation_images=0)
    events = list(train(config))
    assert events[-1].done and os.path.isfile(events[-1].outputs["diffusers"])
    # 48 x 48 -> 32 x 32 covers the square exactly (no crop): the alpha resized as PIL does it.
    alpha = Image.fromarray(np.where(np.arange(48) < 24, 0, 255).astype(np.uint8)[None].repeat(48, 0), mode="L")
    expected = torch.from_numpy(np.asarray(alpha.resize((32, 32), Image.Resampling.LANCZOS)).copy())
    assert len(seen) == 2
    for masks in seen:
        assert masks is not None and masks.shape == (2, 1, 32, 32) and masks.dtype == torch.uint8
        assert all(torch.equal(mask[0], expected) for mask in masks)
        assert torch.all(masks[..., :12] == 0) and torch.all(masks[..., 20:] == 255)
