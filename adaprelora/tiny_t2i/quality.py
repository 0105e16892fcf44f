"""Measure what the built-in model draws, with its judge: prompt accuracy on training and held-out
combinations, sample grids, and the model card that reports both."""
from __future__ import annotations

import os
import random
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from . import scenes
from .judge import Judge, judge_images


def eval_prompts(split: str, count: int, seed: int = 0) -> list[scenes.Scene]:
    """`count` scenes whose captions are the prompts: `split` is "train" (combinations seen in
    training) or "held_out" (the held-out (shape, colour) pairs)."""
    rng = random.Random(seed + (0 if split == "train" else 1))
    held = {"train": False, "held_out": True}[split]
    return [scenes.sample_scene(rng, held_out=held) for _ in range(count)]


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seed: int = 0, guidance_scale: float = 5.0,
             num_inference_steps: int = 25, batch_size: int = 48, **kwargs) -> list[Image.Image]:
    """Images for `prompts`, image i seeded with `seed + i` (so results do not depend on batching)."""
    out: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        gens = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        out += pipe(chunk, generator=gens, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                    height=64, width=64, **kwargs).images
    return out


def score(verdicts, wanted: Sequence[scenes.Scene]) -> dict[str, float]:
    """Fractions right: shape, colour, background, and all three together."""
    n = max(1, len(wanted))
    s = sum(v.shape == w.shape for v, w in zip(verdicts, wanted)) / n
    c = sum(v.colour == w.colour for v, w in zip(verdicts, wanted)) / n
    b = sum(v.background == w.background for v, w in zip(verdicts, wanted)) / n
    a = sum(v.shape == w.shape and v.colour == w.colour and v.background == w.background
            for v, w in zip(verdicts, wanted)) / n
    return {"shape": s, "colour": c, "background": b, "all": a}


def evaluate_base(pipe, judge: Judge, per_split: int = 96, seed: int = 0, **gen_kwargs) -> dict[str, dict]:
    """Judge the pipeline's images for `per_split` training-combination and held-out prompts."""
    result = {}
    for split in ("train", "held_out"):
        wanted = eval_prompts(split, per_split, seed)
        images = generate(pipe, [scenes.caption(s) for s in wanted], seed=10_000 * (split == "held_out"),
                          **gen_kwargs)
        result[split] = score(judge_images(judge, images), wanted)
        result[split]["n"] = len(wanted)
    return result


def grid(images: Sequence[Image.Image], labels: Sequence[str], columns: int = 6, scale: int = 3) -> Image.Image:
    """Images in a grid, each scaled up `scale` times with its prompt written under it."""
    w = images[0].width * scale
    cell_h = w + 30
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (w + 8) + 8, rows * cell_h + 8), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (im, label) in enumerate(zip(images, labels)):
        x, y = 8 + (i % columns) * (w + 8), 8 + (i // columns) * cell_h
        sheet.paste(im.resize((w, w), Image.Resampling.NEAREST), (x, y))
        words = label.split(" on ")
        for j, line in enumerate(words if len(words) == 2 else [label]):
            draw.text((x, y + w + 2 + 11 * j), (line if j == 0 else "on " + line)[:34], fill=(0, 0, 0))
    return sheet


def write_samples_grid(pipe, path: str, seed: int = 0, **gen_kwargs) -> None:
    wanted = eval_prompts("train", 12, seed + 7) + eval_prompts("held_out", 6, seed + 7)
    prompts = [scenes.caption(s) for s in wanted]
    grid(generate(pipe, prompts, seed=seed + 77, **gen_kwargs), prompts).save(path)


def _fmt(q: dict) -> str:
    return f"{q['shape']:.2f} / {q['colour']:.2f} / {q['background']:.2f} / {q['all']:.2f}"


# The `settings` label of a DreamBooth row measured on the base model alone (no LoRA).
BASE_SETTINGS = "base model, no LoRA"


def _is_base(row: dict) -> bool:
    return row["settings"] == BASE_SETTINGS


def _lora_means(rows) -> dict[str, tuple[int, dict]]:
    """Per subject: how many LoRA rows (seeds) it has and their mean scores."""
    keys = ("subject_fidelity", "background", "similarity", "prior")
    by_subject: dict[str, list[dict]] = {}
    for r in rows:
        if not _is_base(r):
            by_subject.setdefault(r["subject"], []).append(r)
    return {s: (len(rs), {k: sum(r[k] for r in rs) / len(rs) for k in keys}) for s, rs in by_subject.items()}


def _dreambooth_md(rows, settings: str = "") -> str:
    """The model card's DreamBooth table from `report["dreambooth"]` (a list of measured runs)."""
    if not rows:
        return ""
    # Rows from before the count was recorded were scored on 28 prompts.
    counts = sorted({r.get("prior_prompts", 28) for r in rows})
    lines = ["", "DreamBooth LoRA on reserved subjects (5 images each, trigger prompt \"a sks shape on a {colour} "
             "background\" for 7 backgrounds x 3 seeds unless the row says otherwise; prior = all-three score on "
             f"{' or '.join(map(str, counts))} ordinary prompts without the trigger, base model first)"
             + (f"; defaults: {settings}" if settings else "") + ":", "",
             "| subject | settings | subject fidelity | background | similarity | prior |", "|---|---|---|---|---|---|"]
    means = _lora_means(rows)

    def line(subject: str, settings: str, r: dict) -> str:
        return (f"| {subject} | {settings} | {r['subject_fidelity']:.2f} | {r['background']:.2f} | "
                f"{r['similarity']:.3f} | {r['prior']:.2f} |")

    for i, r in enumerate(rows):
        lines.append(line(r["subject"], r["settings"], r))
        last_of_subject = i + 1 == len(rows) or rows[i + 1]["subject"] != r["subject"]
        n, mean = means.get(r["subject"], (0, {}))
        if last_of_subject and n > 1:
            lines.append(line(r["subject"], f"**mean of the {n} LoRAs above**", mean))
    return "\n".join(lines) + "\n"


# What the model is meant to reach (the model card says which it does).
TARGETS = {"train": {"shape": 0.95, "colour": 0.97, "background": 0.97}, "held_out": {"all": 0.90},
           "dreambooth": {"subject_fidelity": 0.60, "background": 0.70, "prior_kept": 0.80}}


def _targets_md(report: dict) -> str:
    """A table of the quality targets beside what was measured."""
    q = report["quality"]
    rows = [(f"{split.replace('_', '-')} combinations: {key}", f">= {goal:.2f}", q[split][key])
            for split in ("train", "held_out") for key, goal in TARGETS[split].items()]
    # DreamBooth: the mean of each subject's LoRA rows (one per seed) against its base-model row.
    runs = report.get("dreambooth") or []
    bases = {r["subject"]: r for r in runs if _is_base(r)}
    goals = TARGETS["dreambooth"]
    for subject, (n, lora) in _lora_means(runs).items():
        base = bases.get(subject)
        if base is None:
            continue
        kept = lora["prior"] / base["prior"] if base["prior"] else 0.0
        name = f"DreamBooth ({subject}{f', mean of {n} seeds' if n > 1 else ''})"
        rows += [(f"{name}: subject fidelity", f">= {goals['subject_fidelity']:.2f}", lora["subject_fidelity"]),
                 (f"{name}: background asked for", f">= {goals['background']:.2f}", lora["background"]),
                 (f"{name}: prior kept (LoRA / base)", f">= {goals['prior_kept']:.2f}", kept)]
    lines = ["| quality | target | measured | |", "|---|---|---|---|"]
    for name, goal, value in rows:
        met = value >= float(goal.split()[1]) - 1e-9  # a ratio that is the target exactly counts (float error)
        lines.append(f"| {name} | {goal} | {value:.2f} | {'met' if met else 'not met'} |")
    return "\n".join(lines) + "\n"


def _stages_md(report: dict) -> str:
    """How the shipped weights came about when training ran in several stages (`--init_from`)."""
    stages = report.get("earlier_stages") or []
    if not stages:
        return ""
    lines = ["", "Trained in stages, each continuing the one before with `--init_from` (the numbers above are the "
             "last stage's; the VAE encoder and the judge come from the first):", ""]
    for i, st in enumerate(stages + [report], 1):
        c, q = st["config"], st["quality"]
        work = []
        if st["unet_steps_done"]:
            work.append(f"{st['unet_steps_done']} UNet steps at batch {c['batch_size']}, lr {c['lr']}")
        if c.get("vae_decoder_steps"):
            work.append(f"{c['vae_decoder_steps']} VAE decoder steps, encoder frozen "
                        f"(reconstruction {st['vae_psnr_db']:.1f} dB)")
        lines.append(f"{i}. {' and '.join(work) or 'evaluation only'}, "
                     f"{st['timings']['total_s'] / 60:.0f} min; training combinations shape / colour / background / all "
                     f"{_fmt(q['train'])}, held-out {_fmt(q['held_out'])}")
    total = sum(st["timings"]["total_s"] for st in stages + [report]) / 60
    lines += ["", f"All stages together: {total:.0f} min of CPU time (one torch thread) on the 2-core machine."]
    if report.get("commands"):
        lines += ["", "Commands, in order:", "", "```bash", *report["commands"], "```"]
    return "\n".join(lines) + "\n"


def rewrite_model_card(folder: str) -> None:
    """Write `README.md` again from the folder's `training_report.json` (after adding measurements)."""
    import json

    with open(os.path.join(folder, "training_report.json")) as f:
        write_model_card(folder, json.load(f))


def _unet_attention(config: dict) -> str:
    if config.get("unet_attention_at_16", True):
        return "cross-attention (to_q, to_k, to_v, to_out.0) at all three levels"
    return "cross-attention (to_q, to_k, to_v, to_out.0) at 8 x 8 and 4 x 4, plain ResNet blocks at 16 x 16"


def write_model_card(folder: str, report: dict) -> None:
    """`README.md` of the model folder: data, architecture, training, measured quality."""
    cfg, p, q, t = report["config"], report["parameters"], report["quality"], report["timings"]
    stages = (report.get("earlier_stages") or []) + [report]
    first = stages[0]["config"]  # the VAE encoder and the judge come from here
    # The UNet paragraph describes the last stage that trained it (a later one may train only the decoder).
    unet_stage = next((st for st in reversed(stages) if st["unet_steps_done"]), report)
    ucfg = unet_stage["config"]
    decoder_steps = sum(st["config"].get("vae_decoder_steps", 0) for st in stages)
    decoder_note = (f" then {decoder_steps} steps of the decoder alone with the encoder frozen (same latents, "
                    "sharper pictures)" if decoder_steps else "")
    held = ", ".join(f"{c} {s}" for s, c in scenes.HELD_OUT)
    text = f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion, tiny, synthetic-data]
---
# tiny-sd: a small text-to-image model that draws shapes

The built-in base model of adaprelora: a standard `StableDiffusionPipeline` (AutoencoderKL,
CLIPTextModel + CLIPTokenizer, UNet2DConditionModel, DDIM scheduler) trained from scratch on
generated pictures, so the app, the trainer and the tests have a model that draws with no download.

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("assets/tiny-sd")
pipe("a red circle on a blue background", height=64, width=64, guidance_scale={cfg['guidance_scale']}).images[0]
```

## Data
Made by `adaprelora.tiny_t2i.scenes` from seed {cfg['seed']}: {cfg['num_images']} images of 64 x 64 pixels,
one shape of one colour on a plain background of another colour, at a random size (radius 22-40% of
the side) and position, drawn upright. Captions: "a {{colour}} {{shape}} on a {{background}} background".
- Shapes: {", ".join(scenes.SHAPES)}. Colours and backgrounds: {", ".join(scenes.COLOURS)}.
- Caption variants: 10% empty (for classifier-free guidance), 10% the generic noun "shape", 8% without
  the colour, 6% with a meaningless rare word before the shape ({", ".join(scenes.TRIGGER_WORDS)}), which
  gives DreamBooth trained single-token trigger words.
- Held out of all training, to test composition: {held}.
- Subjects never in the data, kept for personalisation: {", ".join(scenes.SUBJECTS)}.

## Architecture
| part | configuration | parameters |
|---|---|---|
| VAE | AutoencoderKL, channels (16, 32, 64), 1 layer per block, x4 down, 4 latent channels, scaling factor {report['scaling_factor']:.3f} | {p['vae']:,} |
| text encoder | CLIPTextModel, hidden 64, 3 layers, 4 heads, FFN 256; word-level byte BPE tokenizer (each caption word one token) | {p['text_encoder']:,} |
| UNet | UNet2DConditionModel, channels (32, 64, 128), {_unet_attention(first)}, 1 layer per block, heads of 8 channels | {p['unet']:,} |
| judge | CNN, 4 stages, 128-d embedding, shape / colour / background heads | {p['judge']:,} |

## Training
`python scripts/train_tiny_sd.py` (seeded; torch threads: {report['torch_threads']}).
- VAE: {first['vae_steps']} steps, batch {first['vae_batch_size']}, AdamW {first['vae_lr']}, cosine, L1 + MSE + 1e-6 KL{decoder_note};
  reconstruction PSNR {report['vae_psnr_db']:.1f} dB.
- Text encoder + UNet, jointly on cached latents{' (the last stage that trained them)' if report.get('earlier_stages') else ''}: {unet_stage['unet_steps_done']} steps,
  batch {ucfg['batch_size']}, AdamW {ucfg['lr']} (weight decay {ucfg['weight_decay']}), {ucfg['warmup_steps']} warm-up
  steps then cosine, gradient clip 1, epsilon prediction on SD's noise schedule, min-SNR-{ucfg['snr_gamma']:g}
  weighting; EMA {ucfg['ema_decay']} weights shipped. Final loss {unet_stage['final_loss']:.4f}.
- Judge: {first['judge_steps']} steps on freshly drawn scenes of every shape and subject, with blur, noise and
  colour-cast augmentation.
- {'Time of the last stage' if report.get('earlier_stages') else 'Time'}: {t['total_s'] / 60:.1f} min in all (data {t['data_s']:.0f} s, VAE {t['vae_s'] + t.get('vae_decoder_s', 0):.0f} s, UNet
  {t['unet_s']:.0f} s, judge {t['judge_s']:.0f} s, evaluation {t['eval_s']:.0f} s) on a 2-core x86-64 CPU.

{_stages_md(report)}
## Quality (measured by the judge)
Judge accuracy on {cfg.get('judge_eval_images', 1000):,} freshly drawn images (shape / colour / background):
{report['judge_accuracy']['shape']:.3f} / {report['judge_accuracy']['colour']:.3f} / {report['judge_accuracy']['background']:.3f}.

Generated images, DDIM {cfg['num_inference_steps']} steps, guidance {cfg['guidance_scale']}, one seed per image:

| prompts | images | shape / colour / background / all three |
|---|---|---|
| training combinations | {q['train']['n']} | {_fmt(q['train'])} |
| held-out combinations | {q['held_out']['n']} | {_fmt(q['held_out'])} |
{_dreambooth_md(report.get('dreambooth'), report.get('dreambooth_settings', ''))}
Against the targets:

{_targets_md(report)}
![samples](samples.png)

`samples.png`: 12 training-combination prompts, then 6 held-out ones, prompt under each image.

## Limits
{report.get('limits', '')}64 x 64 pixels only; it knows the words above and nothing else (other words tokenize
but mean nothing to it). Made for demos and tests of LoRA training, not for pictures of the world.
"""
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(text)


__all__ = ["BASE_SETTINGS", "eval_prompts", "evaluate_base", "generate", "grid", "rewrite_model_card", "score", "write_model_card",
           "write_samples_grid"]
