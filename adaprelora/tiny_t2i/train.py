"""Train the built-in text-to-image model from scratch on generated scenes, then its judge.

Stages: draw the data set; train the VAE; encode every image once; train the text encoder and the
UNet together on the cached latents (epsilon prediction, SD's noise schedule, min-SNR weighting,
EMA weights); save a standard `StableDiffusionPipeline` folder; train the judge; measure quality;
write the model card and a sample grid. `scripts/train_tiny_sd.py` is the command line.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..training.errors import UserError
from . import models, scenes


@dataclass
class TinyT2IConfig:
    """Every setting of a from-scratch run (the model card records them)."""

    output_dir: str = "assets/tiny-sd"
    seed: int = 0
    num_images: int = 32768
    vae_steps: int = 700
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    # Then train the VAE decoder alone with the encoder frozen: sharper pictures with the same latents,
    # so a UNet trained on them stays valid (what sd-vae-ft-mse did for Stable Diffusion).
    vae_decoder_steps: int = 0
    unet_steps: int = 6000
    # No attention at the UNet's 16 x 16 level: about 1.7x faster steps, so more of them fit the hour.
    unet_attention_at_16: bool = False
    batch_size: int = 64
    lr: float = 6e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 200
    snr_gamma: float = 5.0
    ema_decay: float = 0.999
    judge_steps: int = 500
    # Freshly drawn scenes the judge's accuracy is measured on (the model card's first quality line).
    judge_eval_images: int = 1000
    eval_per_split: int = 96
    guidance_scale: float = 5.0
    num_inference_steps: int = 25
    threads: int = 2
    # The UNet stops this many minutes after the start, or after `unet_steps`, whichever comes first; its
    # cosine follows whichever is ahead, so a slow or busy machine still ends on annealed weights.
    time_limit_minutes: Optional[float] = 50.0
    # Continue from an earlier tiny-sd folder: its VAE and judge are kept, its text encoder and UNet
    # trained further (a fresh optimizer and schedule).
    init_from: Optional[str] = None
    extra: dict = field(default_factory=dict)


def caption_for_training(scene: scenes.Scene, rng: random.Random) -> str:
    """A caption with the variations the model should understand: the full form most of the time,
    sometimes the generic noun, no colour, a trigger-word filler, or nothing (for guidance)."""
    u = rng.random()
    if u < 0.10:
        return ""
    if u < 0.20:
        return scenes.caption(scene, noun=scenes.GENERIC_NOUN)
    if u < 0.28:
        return f"a {scene.shape} on a {scene.background} background"
    if u < 0.34:
        return scenes.caption(scene, noun=f"{rng.choice(scenes.TRIGGER_WORDS)} {scene.shape}")
    return scenes.caption(scene)


def make_dataset(seed: int, count: int):
    """`count` training scenes (no held-out pair, no subject) and their images as uint8 (N, 3, 64, 64)."""
    data = list(scenes.scenes(seed, count))
    images = np.stack([np.asarray(scenes.render(s, models.IMAGE_SIZE)) for s in data]).transpose(0, 3, 1, 2)
    return data, torch.from_numpy(np.ascontiguousarray(images))


def _to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1.0


def _cosine(step: int, total: int, warmup: int, elapsed: float = 0.0) -> float:
    """Linear warm-up, then cosine to zero by `total` steps, or sooner when `elapsed` (the fraction
    of a time budget spent) runs ahead of the steps: a run cut short by time still ends annealed."""
    if step < warmup:
        return (step + 1) / warmup
    done = max((step - warmup) / max(1, total - warmup), elapsed)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def _fit_reconstruction(vae, params, images: torch.Tensor, steps: int, cfg: TinyT2IConfig, gen, latents, label: str,
                        bar=None):
    """The VAE's training loop, shared by the full VAE and the decoder-only stage: AdamW on `params`,
    cosine lr, L1 + MSE reconstruction of random batches; `latents(x, idx, gen)` gives the latents to
    decode and an extra loss term."""
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * _cosine(step, steps, 50)
        idx = torch.randint(0, len(images), (cfg.vae_batch_size,), generator=gen)
        x = _to_unit(images[idx])
        z, extra = latents(x, idx, gen)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if bar is not None:
            bar.set_postfix_str(f"{label} loss {float(loss):.4f}")
            bar.update(1)
    return vae.eval()


def train_vae(images: torch.Tensor, cfg: TinyT2IConfig, bar=None):
    vae = models.build_vae()

    def sampled(x, _idx, gen):
        posterior = vae.encode(x).latent_dist
        return posterior.sample(generator=gen), 1e-6 * posterior.kl().mean()

    return _fit_reconstruction(vae, list(vae.parameters()), images, cfg.vae_steps, cfg,
                               torch.Generator().manual_seed(cfg.seed + 1), sampled, "vae", bar)


def finetune_vae_decoder(vae, images: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, cfg: TinyT2IConfig,
                         bar=None):
    """Train the decoder (and `post_quant_conv`) on latents drawn from the frozen encoder's cached
    posteriors; the encoder, hence every latent and the UNet's data, is untouched."""
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)

    def cached(_x, idx, gen):
        return means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen), 0.0

    _fit_reconstruction(vae, params, images, cfg.vae_decoder_steps, cfg, torch.Generator().manual_seed(cfg.seed + 6),
                        cached, "decoder", bar)
    vae.requires_grad_(False)
    return vae


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 256):
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(_to_unit(images[i:i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor) -> float:
    x = _to_unit(images)
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (x + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def train_denoiser(data, means, stds, tokenizer, cfg: TinyT2IConfig, scaling_factor: float, bar=None,
                   deadline: Optional[float] = None, unet=None, text_encoder=None):
    """Train text encoder + UNet jointly (new ones unless given); returns their EMA copies and the loss log."""
    from diffusers import DDPMScheduler

    torch.manual_seed(cfg.seed + 2)
    unet = unet if unet is not None else models.build_unet(cfg.unet_attention_at_16)
    text_encoder = text_encoder if text_encoder is not None else models.build_text_encoder(tokenizer)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in models.scheduler_config().items()
                                       if k not in ("set_alpha_to_one", "steps_offset")})
    alphas = noise_scheduler.alphas_cumprod
    snr_all = alphas / (1 - alphas)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    rng = random.Random(cfg.seed + 3)
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    losses = []
    unet.train()
    text_encoder.train()
    started = time.time()
    for step in range(cfg.unet_steps):
        # The share of the time budget spent: the learning rate follows it when it leads the steps.
        elapsed = (time.time() - started) / max(1e-9, deadline - started) if deadline is not None else 0.0
        if elapsed >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _cosine(step, cfg.unet_steps, cfg.warmup_steps, elapsed)
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling_factor
        ids = tokenizer([caption_for_training(data[i], rng) for i in idx.tolist()], padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        snr = snr_all[t]
        weight = torch.clamp(snr, max=cfg.snr_gamma) / snr
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - d)
        losses.append(float(loss))
        if bar is not None:
            bar.set_postfix_str(f"unet loss {np.mean(losses[-50:]):.4f}")
            bar.update(1)
    return ema_unet.eval(), ema_text.eval(), losses


def assemble_pipeline(unet, vae, text_encoder, tokenizer):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler(**models.scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(cfg: TinyT2IConfig) -> dict:
    """Train everything and write `cfg.output_dir` (written to a temporary sibling, then moved in)."""
    from .judge import judge_accuracy, save_judge, train_judge
    from .quality import evaluate_base, write_model_card, write_samples_grid

    torch.set_num_threads(cfg.threads)
    start = time.time()
    deadline = start + cfg.time_limit_minutes * 60 if cfg.time_limit_minutes else None
    timings: dict[str, float] = {}
    total = cfg.vae_steps + cfg.vae_decoder_steps + cfg.unet_steps + cfg.judge_steps
    bar = tqdm(total=total, desc="tiny-sd", unit="step", mininterval=2.0)

    t = time.time()
    data, images = make_dataset(cfg.seed, cfg.num_images)
    timings["data_s"] = time.time() - t
    t = time.time()
    previous = None
    if cfg.init_from:
        from diffusers import StableDiffusionPipeline

        previous = StableDiffusionPipeline.from_pretrained(cfg.init_from)
        vae, tokenizer = previous.vae.eval(), previous.tokenizer
        scaling_factor = float(vae.config.scaling_factor)
        bar.update(cfg.vae_steps)
    else:
        vae = train_vae(images, cfg, bar)
        tokenizer = models.build_tokenizer()
    timings["vae_s"] = time.time() - t
    t = time.time()
    means, stds = encode_all(vae, images)
    if previous is None:
        scaling_factor = float(1.0 / means.std())
        vae.register_to_config(scaling_factor=scaling_factor)
    timings["encode_s"] = time.time() - t
    if cfg.vae_decoder_steps:
        t = time.time()
        finetune_vae_decoder(vae, images, means, stds, cfg, bar)
        timings["vae_decoder_s"] = time.time() - t
    psnr = reconstruction_psnr(vae, images[-256:])
    t = time.time()
    unet, text_encoder, losses = train_denoiser(
        data, means, stds, tokenizer, cfg, scaling_factor, bar, deadline,
        unet=previous.unet.train() if previous else None,
        text_encoder=previous.text_encoder.train() if previous else None)
    timings["unet_s"] = time.time() - t
    if cfg.unet_steps and not losses:
        bar.close()
        raise UserError(f"--time_limit_minutes {cfg.time_limit_minutes:g} ran out before the UNet's first step "
                        f"(data and VAE took {(time.time() - start) / 60:.1f} min); give more time or 0 for no limit")
    del images, means, stds

    t = time.time()
    if cfg.init_from and cfg.judge_steps == 0:
        from .judge import load_judge

        judge = load_judge(os.path.join(cfg.init_from, "judge"))
    else:
        judge = train_judge(steps=cfg.judge_steps, seed=cfg.seed + 5, progress=lambda _step, _loss: bar.update(1))
    judge_metrics = judge_accuracy(judge, count=cfg.judge_eval_images)
    timings["judge_s"] = time.time() - t
    bar.close()

    tmp = cfg.output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer)
    pipe.save_pretrained(tmp, safe_serialization=True)
    save_judge(judge, os.path.join(tmp, "judge"), judge_metrics)

    t = time.time()
    quality = evaluate_base(pipe, judge, per_split=cfg.eval_per_split, guidance_scale=cfg.guidance_scale,
                            num_inference_steps=cfg.num_inference_steps, seed=cfg.seed)
    timings["eval_s"] = time.time() - t
    write_samples_grid(pipe, os.path.join(tmp, "samples.png"), seed=cfg.seed, guidance_scale=cfg.guidance_scale,
                       num_inference_steps=cfg.num_inference_steps)
    timings["total_s"] = time.time() - start
    report = {
        "config": asdict(cfg),
        "parameters": {"vae": models.parameter_count(vae), "text_encoder": models.parameter_count(text_encoder),
                       "unet": models.parameter_count(unet), "judge": models.parameter_count(judge)},
        "unet_steps_done": len(losses),
        "final_loss": float(np.mean(losses[-100:])) if losses else None,
        "vae_psnr_db": psnr,
        "scaling_factor": scaling_factor,
        "judge_accuracy": judge_metrics,
        "quality": quality,
        "timings": timings,
        "torch_threads": cfg.threads,
    }
    if cfg.init_from and os.path.isfile(os.path.join(cfg.init_from, "training_report.json")):
        with open(os.path.join(cfg.init_from, "training_report.json")) as f:
            earlier = json.load(f)
        report["earlier_stages"] = earlier.get("earlier_stages", []) + [
            {k: earlier.get(k) for k in ("config", "unet_steps_done", "final_loss", "vae_psnr_db", "quality", "timings")}]
    with open(os.path.join(tmp, "training_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    write_model_card(tmp, report)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    os.replace(tmp, cfg.output_dir)
    return report


__all__ = ["TinyT2IConfig", "assemble_pipeline", "caption_for_training", "finetune_vae_decoder", "make_dataset", "run"]
