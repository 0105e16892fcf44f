"""The held-out denoising loss (adaprelora/training/dreambooth/validation_loss.py) on the tiny
pipelines built in code: the same weights give the same value whatever the global RNG does; the
value equals a float64 loop written out here (epsilon and v-prediction, SDXL's added conditioning);
and it falls when LoRA training on images of the same kind teaches the model something."""
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from PIL import Image, ImageDraw  # noqa: E402

from adaprelora.training.dreambooth.loss import prediction_target  # noqa: E402
from adaprelora.training.dreambooth.validation_loss import (  # noqa: E402
    ValidationLossSet,
    split_holdout,
    spread_timesteps,
)
from adaprelora.training.errors import UserError  # noqa: E402

RES = 32
SIZE = (40, 36)  # (width, height): resized to cover 32 x 32 and cropped, so the crop is not (0, 0)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these models are tiny, and on a busy 2-core machine a second thread made
    each forward many times slower (a 7 s test took 586 s with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _disc_images(count: int, seed: int) -> list:
    """A red disc at a random place on a blue background: every image of the same kind."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        img = Image.new("RGB", SIZE, (30, 60, 200))
        x, y = rng.integers(4, 24), rng.integers(4, 20)
        ImageDraw.Draw(img).ellipse([x, y, x + 12, y + 12], fill=(220, 40, 40))
        out.append(img)
    return out


def _scheduler(prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type)


def _sd_models(prediction_type="epsilon", lora=True):
    from peft import LoraConfig

    from adaprelora.testing.tiny_sd import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline()
    unet = pipe.unet
    unet.requires_grad_(False)
    if lora:
        torch.manual_seed(5)  # init_lora_weights=False: B is random too, so the adapter changes the output
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                    init_lora_weights=False))
    # the fields of the trainer's DreamBoothModels that the validation loss reads
    return SimpleNamespace(tokenizers=(pipe.tokenizer,), noise_scheduler=_scheduler(prediction_type),
                           text_encoders=(pipe.text_encoder,), vae=pipe.vae, unet=unet, weight_dtype=torch.float32,
                           text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)


CAPTIONS = ["a photo of sks disc", "sks disc on blue", "a red sks disc"]


def _vset(models, **kw):
    kw.setdefault("batch_size", 5)  # 3 images x 4 timesteps = 12 pairs: batches of 5, 5 and 2
    return ValidationLossSet.from_images(_disc_images(3, seed=1), CAPTIONS, models.vae, models.noise_scheduler,
                                         resolution=RES, **kw)


@pytest.mark.slow
def test_same_weights_same_value_whatever_the_global_rng():
    models = _sd_models()
    vset = _vset(models)
    torch.manual_seed(0)
    first = vset.evaluate(models)
    torch.manual_seed(1234)
    torch.randn(1000)
    np.random.seed(99)
    second = vset.evaluate(models)
    assert first == second and math.isfinite(first)
    # a set built again from the same seed holds the same noise; another seed other noise
    again = _vset(models)
    assert torch.equal(again.noise, vset.noise) and torch.equal(again.latents, vset.latents)
    assert again.evaluate(models) == first
    other = _vset(models, seed=1)
    assert not torch.equal(other.noise, vset.noise) and other.evaluate(models) != first
    # the batch size changes nothing but the grouping
    assert _vset(models, batch_size=12).evaluate(models) == pytest.approx(first, rel=1e-6)
    assert vset.timesteps.tolist() == spread_timesteps(1000, 4) == [125, 375, 625, 875]


def test_eval_mode_inside_train_mode_restored_and_no_gradients():
    models = _sd_models()
    vset = _vset(models)
    seen = []
    handle = models.unet.conv_in.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    models.unet.train()
    models.text_encoder.train()
    lora = [p for n, p in models.unet.named_parameters() if "lora" in n]
    for p in lora:
        p.requires_grad_(True)
    vset.evaluate(models)
    handle.remove()
    assert seen and all(not training and not grad for training, grad in seen)
    assert models.unet.training and models.text_encoder.training
    assert all(p.grad is None for p in lora)
    models.unet.eval()
    vset.evaluate(models)
    assert not models.unet.training


def _reference_loss(models, vset, images, prediction_type):
    """float64 throughout: a copy of each model in double, every image and timestep one by one,
    noising and the target written out from the scheduler's betas."""
    from adaprelora.training.dreambooth.buckets import fit_to_bucket

    unet = copy.deepcopy(models.unet).double().eval()
    text_encoder = copy.deepcopy(models.text_encoder).double().eval()
    vae = copy.deepcopy(models.vae).double().eval()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    timesteps = spread_timesteps(1000, 4)
    n = len(images)
    noise = torch.randn((n, len(timesteps), 4, RES // 2, RES // 2), generator=torch.Generator().manual_seed(vset.seed))
    total = 0.0
    with torch.no_grad():
        for i, (img, caption) in enumerate(zip(images, CAPTIONS)):
            px = fit_to_bucket(img, (RES, RES), center_crop=True)[0][None].double()
            x0 = vae.encode(px).latent_dist.mean * vae.config.scaling_factor
            assert torch.allclose(x0.float(), vset.latents[i:i + 1], atol=1e-4)
            ids = models.tokenizer([caption], padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids
            hidden = text_encoder(ids)[0]
            for j, t in enumerate(timesteps):
                eps = noise[i, j][None].double()
                a = alphas_cumprod[t]
                noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
                pred = unet(noisy, torch.tensor([t]), hidden).sample
                target = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
                total += float(((pred - target) ** 2).mean())
    return total / (n * len(timesteps))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.slow
def test_value_equals_float64_reference(prediction_type):
    models = _sd_models(prediction_type)
    vset = _vset(models)
    value = vset.evaluate(models)
    ref = _reference_loss(models, vset, _disc_images(3, seed=1), prediction_type)
    assert value == pytest.approx(ref, rel=2e-4)
    # the adapter is part of what is scored: without it the value moves (by ~7e-4 relative here,
    # hundreds of times float32's rounding)
    models.unet.disable_adapters()
    assert abs(vset.evaluate(models) - value) > 1e-5 * value


def test_sdxl_value_equals_pipeline_conditioning():
    """SDXL: both encoders' penultimate states and the pooled embedding as the SDXL pipeline's own
    encode_prompt builds them, and time ids written out by hand (36 x 40 image, cropped 2 px left)."""
    from adaprelora.testing.tiny_sdxl import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    # the encoders named one by one (text_encoder, text_encoder_2) instead of as a tuple
    models = SimpleNamespace(tokenizer=pipe.tokenizer, noise_scheduler=_scheduler(), text_encoder=pipe.text_encoder,
                             vae=pipe.vae, unet=pipe.unet, tokenizer_2=pipe.tokenizer_2,
                             text_encoder_2=pipe.text_encoder_2)
    images = _disc_images(2, seed=3)
    vset = ValidationLossSet.from_images(images, CAPTIONS[:2], pipe.vae, models.noise_scheduler, resolution=RES,
                                         num_timesteps=3, batch_size=4)
    value = vset.evaluate(models)
    assert vset.evaluate(models) == value
    assert vset.original_sizes == [(36, 40)] * 2 and vset.crop_top_lefts == [(0, 2)] * 2
    ref = []
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS[:2], device="cpu", do_classifier_free_guidance=False)
        for i in range(2):
            for j, t in enumerate(vset.timesteps.tolist()):
                x0, eps = vset.latents[i:i + 1], vset.noise[i, j][None]
                tt = torch.tensor([t])
                noisy = models.noise_scheduler.add_noise(x0, eps, tt)
                added = {"text_embeds": pooled[i:i + 1], "time_ids": torch.tensor([[36.0, 40.0, 0.0, 2.0, RES, RES]])}
                pred = pipe.unet(noisy, tt, embeds[i:i + 1], added_cond_kwargs=added).sample
                ref.append(float(((pred - prediction_target(models.noise_scheduler, x0, eps, tt)) ** 2).mean()))
    assert value == pytest.approx(sum(ref) / len(ref), rel=1e-5)


def test_falls_when_training_on_images_of_the_same_kind():
    """Training the UNet on other discs (never the held-out ones) lowers the held-out discs' loss
    (measured 1.096 -> 0.35 after 8 steps)."""
    models = _sd_models(lora=False)
    vset = _vset(models)
    before = vset.evaluate(models)
    train = ValidationLossSet.from_images(_disc_images(4, seed=2), ["a red sks disc"] * 4, models.vae,
                                          models.noise_scheduler, resolution=RES)
    params = list(models.unet.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = models.noise_scheduler
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hidden = models.text_encoder(models.tokenizer(["a red sks disc"] * 4, padding="max_length", max_length=77,
                                                      return_tensors="pt").input_ids)[0]
    models.unet.train()
    for _ in range(8):
        x0 = train.latents
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
        pred = models.unet(sched.add_noise(x0, eps, t), t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred, prediction_target(sched, x0, eps, t))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = vset.evaluate(models)
    assert models.unet.training
    assert after < 0.7 * before, (before, after)


def test_folder_captions_and_holdout_split(tmp_path):
    models = _sd_models(lora=False)
    for i, img in enumerate(_disc_images(3, seed=4)):
        img.save(tmp_path / f"{i}.png")
    (tmp_path / "1.txt").write_text("its own caption\n")
    vset = ValidationLossSet.from_folder(str(tmp_path), models.vae, models.noise_scheduler, resolution=RES,
                                         default_caption="sks disc")
    assert vset.captions == ["sks disc", "its own caption", "sks disc"] and len(vset) == 3
    items = list(range(10))
    kept, held = split_holdout(items, 0.2, seed=0)
    assert len(held) == 2 and sorted(kept + held) == items and split_holdout(items, 0.2, seed=0) == (kept, held)
    assert len(split_holdout([1, 2], 0.9)[0]) == 1 and len(split_holdout([1, 2], 0.01)[1]) == 1
    for bad in (lambda: split_holdout([1], 0.5), lambda: split_holdout(items, 1.0),
                lambda: ValidationLossSet.from_folder(str(tmp_path / "none"), models.vae, models.noise_scheduler,
                                                      resolution=RES),
                lambda: _vset(models, timesteps=[1000]),
                lambda: ValidationLossSet.from_images(_disc_images(2, 0), ["one"], models.vae, models.noise_scheduler,
                                                      resolution=RES)):
        with pytest.raises(UserError):
            bad()
