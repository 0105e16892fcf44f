"""DreamBooth on the built-in model, measured: subject images to train on, the default settings for
this model, and the judge's scores of what a LoRA then draws.

    folder = write_subject_images("heart", "/tmp/heart")          # 5 PNGs + sidecar captions
    scores = evaluate_lora(pipe, judge, "heart", lora_dir="/tmp/lora-heart")

The trigger prompt is "a sks shape on a {background} background": "sks" is one of the base model's
trained filler words, "shape" its generic noun, so before training the prompt draws some base shape
and after it should draw the subject.
"""
from __future__ import annotations

import os
import random
from typing import Optional

from . import scenes
from .judge import Judge, judge_images, similarity
from .quality import generate, score

TRIGGER = "sks"
CLASS_NOUN = scenes.GENERIC_NOUN
# DreamBooth settings for this model (the app's defaults and the tests' run), chosen by measuring
# the judge's subject fidelity, background and prior on reserved subjects (heart to tune, crescent,
# striped ring and arrow to check; single runs of 21 trigger-word images and 48 ordinary prompts,
# about +-0.1) on the model's earlier weights (seven shapes, rotated); the model card has the
# defaults' runs on the shipped ones. What mattered, in the order found:
# - batch 4 instead of 1: heart fidelity 0.24 -> 0.71 at the same 400 steps;
# - prior preservation on captioned ordinary scenes (`write_class_images`, each image with its own
#   prompt) instead of the base model's drawings of one class prompt: every prompt the LoRA must not
#   disturb is trained on;
# - class caption dropout 0.2 (a fifth of the class images trained on the empty prompt): without
#   it the LoRA moved the *unconditional* prediction towards the subject (the empty prompt drew
#   the subject's colour in 11 of 12 images), and guidance at 5 pushed every other prompt away from
#   it: red shapes came out black, yellow ones orange (all three right on ordinary prompts 0.50-0.54
#   for crescent). With it, at the same steps: crescent fidelity 0.48 -> 0.81 and ordinary prompts
#   0.50 -> 0.92; heart 0.43 -> 0.48 and 0.79 -> 0.88 (rates 0.3 and 0.5 did no better);
# - batch 8 instead of 4 (twice the time per step): heart 0.48 -> 0.67, arrow 0.52 -> 0.71, ordinary
#   prompts 0.88 -> 0.96 and 0.85 -> 0.85; a sixth image at batch 4 helped heart (0.67) but not
#   arrow (0.52);
# - lr 2e-3: 3e-3 gave heart the same fidelity at batch 4 and more at batch 8 (0.76), both with a
#   lower prior (0.83, 0.81);
# - no help: cross-attention-only LoRA (to_k, to_v) learnt nothing; the feed-forward and projections,
#   rank 32, a larger class set (1600 scenes), training the trigger word's embedding as well,
#   warm-up or a cosine schedule did not help;
# - min-SNR-5 loss weighting (`snr_gamma`, what the base model was trained with): over three seeds,
#   arrow fidelity 0.68 -> 0.71 and ordinary prompts 0.79 -> 0.85 (28 prompts); striped ring's
#   ordinary prompts stayed where they were (0.75 -> 0.74) and its fidelity 0.90 -> 0.86. Adding
#   LoRA dropout 0.1 or 512 class images to it did no better on striped ring (seed 0: 0.79, 0.79).
# CLASS_PROMPT is the caption of any class image without one (and what the trainer would draw with).
CLASS_PROMPT = f"a {scenes.GENERIC_NOUN} on a white background"
DREAMBOOTH_DEFAULTS = dict(resolution=64, max_train_steps=400, learning_rate=2e-3, rank=16, train_batch_size=8,
                           lr_scheduler="constant", train_text_encoder=True, with_prior_preservation=True,
                           class_prompt=CLASS_PROMPT, num_class_images=64, class_caption_dropout_rate=0.2,
                           snr_gamma=5.0)


def trigger_prompt(background: str, trigger: str = TRIGGER) -> str:
    return f"a {trigger} {CLASS_NOUN} on a {background} background"


def write_subject_images(subject: str, folder: str, count: int = 5, seed: int = 0, trigger: str = TRIGGER,
                         captions: bool = True) -> list[str]:
    """`count` PNGs of `subject` in `folder`, each with a sidecar `.txt` caption naming its background
    (what a careful user uploads); returns the image paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, scene in enumerate(scenes.subject_scenes(subject, count, seed=seed)):
        stem = os.path.join(folder, f"{subject.replace(' ', '_')}_{i}")
        scenes.render(scene).save(stem + ".png")
        if captions:
            with open(stem + ".txt", "w") as f:
                f.write(trigger_prompt(scene.background, trigger))
        paths.append(stem + ".png")
    return paths


def write_class_images(folder: str, count: int = 100, seed: int = 7) -> list[str]:
    """`count` ordinary training scenes with their captions as sidecar `.txt` files: the prior-
    preservation set (kohya's captioned regularisation images) for DreamBooth on the built-in model,
    drawn by the scene generator, so every ordinary prompt the LoRA must keep is in it."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        scene = scenes.sample_scene(rng)
        stem = os.path.join(folder, f"class_{i:04d}")
        scenes.render(scene).save(stem + ".png")
        with open(stem + ".txt", "w") as f:
            f.write(scenes.caption(scene))
        paths.append(stem + ".png")
    return paths


def recontext_backgrounds(subject: str) -> list[str]:
    """Backgrounds to ask for after training: every colour except the subject's own."""
    return [c for c in scenes.COLOURS if c != scenes.SUBJECT_COLOURS[subject]]


def evaluate_lora(pipe, judge: Judge, subject: str, *, lora_dir: Optional[str] = None, per_background: int = 3,
                  prior_prompts: int = 28, seed: int = 0, lora_scale: float = 1.0, trigger: str = TRIGGER,
                  **gen_kwargs) -> dict:
    """Judge what `pipe` (with the LoRA in `lora_dir` loaded, or the bare base model) draws for one
    of the reserved subjects.

    Returns `subject_fidelity` (fraction of trigger-prompt images the judge calls `subject`),
    `background` (fraction with the asked-for background), `similarity` (mean cosine of the judge
    embedding to the subject's real images), and `prior` (the judge's all-three score on ordinary
    prompts without the trigger word: compare it with the base model's).
    """
    references = [scenes.render(s) for s in scenes.subject_scenes(subject, 8, seed=seed + 99)]
    return evaluate_subject(pipe, judge, references, subject=subject, backgrounds=recontext_backgrounds(subject),
                            lora_dir=lora_dir, per_background=per_background, prior_prompts=prior_prompts, seed=seed,
                            lora_scale=lora_scale, trigger=trigger, **gen_kwargs)


def evaluate_subject(pipe, judge: Judge, references, *, subject: Optional[str] = None,
                     backgrounds: Optional[list[str]] = None, lora_dir: Optional[str] = None, per_background: int = 3,
                     prior_prompts: int = 28, seed: int = 0, lora_scale: float = 1.0, trigger: str = TRIGGER,
                     **gen_kwargs) -> dict:
    """`evaluate_lora` for any subject given by its images (`references`, PIL): the judge's class
    (`subject_fidelity`) only when `subject` is one it knows (else None); `similarity` (embedding
    cosine to the references, like CLIP-I / DINO scores), `background` (prompt fidelity on the
    recontextualisation prompts, one per background in `backgrounds`) and `prior` work for any
    subject. `prior_prompts=0` skips the prior check (None)."""
    backgrounds = list(backgrounds or scenes.COLOURS)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    kwargs = dict(gen_kwargs)
    if lora_dir is not None:
        kwargs["cross_attention_kwargs"] = {"scale": lora_scale}
    try:
        asked = [bg for bg in backgrounds for _ in range(per_background)]
        images = generate(pipe, [trigger_prompt(bg, trigger) for bg in asked], seed=seed + 500, **kwargs)
        verdicts = judge_images(judge, images)
        known = subject in scenes.ALL_SHAPES
        fidelity = sum(v.shape == subject for v in verdicts) / len(verdicts) if known else None
        background = sum(v.background == bg for v, bg in zip(verdicts, asked)) / len(verdicts)
        prior = None
        if prior_prompts:
            rng = random.Random(seed + 1)
            base_wanted = [scenes.sample_scene(rng) for _ in range(prior_prompts)]
            base_images = generate(pipe, [scenes.caption(s) for s in base_wanted], seed=seed + 900, **kwargs)
            prior = score(judge_images(judge, base_images), base_wanted)["all"]
    finally:
        if lora_dir is not None:
            pipe.unload_lora_weights()
    return {"subject_fidelity": fidelity, "background": background,
            "similarity": similarity(verdicts, judge_images(judge, list(references))), "prior": prior,
            "n": len(asked), "images": images, "prompts": [trigger_prompt(bg, trigger) for bg in asked]}


__all__ = ["CLASS_NOUN", "CLASS_PROMPT", "DREAMBOOTH_DEFAULTS", "TRIGGER", "evaluate_lora", "evaluate_subject",
           "recontext_backgrounds", "trigger_prompt", "write_class_images", "write_subject_images"]
