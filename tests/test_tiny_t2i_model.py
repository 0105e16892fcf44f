"""The shipped built-in model `assets/tiny-sd`: it loads offline from the repository alone, draws what
its prompts ask for (by its judge), and a DreamBooth LoRA trained on it through `accelerate launch`
learns a subject the base model never saw.

Thresholds sit well under what was measured on the shipped weights with these fixed seeds (the
numbers are beside each one and in `assets/tiny-sd/README.md`) and far above chance, so they catch a
broken model or trainer, not noise.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adaprelora.tiny_t2i import TINY_SD_DIR, scenes
from adaprelora.tiny_t2i.judge import judge_accuracy, judge_images, load_judge
from adaprelora.tiny_t2i.personalise import evaluate_lora, trigger_prompt, write_class_images, write_subject_images
from adaprelora.tiny_t2i.quality import eval_prompts, generate, score

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(TINY_SD_DIR)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def judge():
    return load_judge(os.path.join(TINY_SD_DIR, "judge"))


def test_model_folder_is_small_and_complete():
    files = [p for p in Path(TINY_SD_DIR).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 30 * 2**20
    names = {str(p.relative_to(TINY_SD_DIR)) for p in files}
    for needed in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                   "text_encoder/model.safetensors", "scheduler/scheduler_config.json", "judge/judge.safetensors",
                   "README.md", "samples.png"):
        assert needed in names, needed
    assert not any(n.endswith((".bin", ".pt", ".ckpt")) for n in names), "only safetensors weights"


@pytest.mark.slow
def test_loads_offline_from_the_repository_alone(tmp_path):
    """A fresh process with an empty Hugging Face cache and the Hub switched off loads and draws."""
    code = ("import sys; from diffusers import StableDiffusionPipeline, DDIMScheduler;"
            f"p = StableDiffusionPipeline.from_pretrained({TINY_SD_DIR!r});"
            "assert isinstance(p.scheduler, DDIMScheduler) and not p.scheduler.config.clip_sample;"
            "assert len(p.tokenizer) > 600, len(p.tokenizer);"
            "im = p('a red circle on a blue background', num_inference_steps=2, height=64, width=64).images[0];"
            "assert im.size == (64, 64)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf" / "hub").iterdir())


def test_judge_reads_drawn_scenes(judge):
    acc = judge_accuracy(judge, count=400, seed=777)
    assert acc["shape"] >= 0.97 and acc["colour"] >= 0.97 and acc["background"] >= 0.97, acc


@pytest.mark.slow
def test_draws_the_asked_shape_colour_and_background(pipe, judge):
    wanted = eval_prompts("train", 24, seed=3)
    images = generate(pipe, [scenes.caption(s) for s in wanted], seed=4242, guidance_scale=5.0, num_inference_steps=25)
    result = score(judge_images(judge, images), wanted)
    print("training combinations", result)
    # measured on the shipped weights (these 24 prompts): shape 1.00, colour 1.00, background 1.00;
    # chance is about 0.14 / 0.13 / 0.13
    assert result["shape"] >= 0.8 and result["colour"] >= 0.9 and result["background"] >= 0.9, result


@pytest.mark.slow
def test_composes_held_out_combinations(pipe, judge):
    wanted = eval_prompts("held_out", 24, seed=3)
    images = generate(pipe, [scenes.caption(s) for s in wanted], seed=4343, guidance_scale=5.0, num_inference_steps=25)
    result = score(judge_images(judge, images), wanted)
    print("held-out combinations", result)
    # measured: all three right in 1.00 of these 24 images; chance is about 0.002
    assert result["all"] >= 0.75, result


def test_example_subject_is_shipped_with_captions():
    images = sorted(EXAMPLES.glob("*.png"))
    assert 4 <= len(images) <= 6
    for image in images:
        caption = image.with_suffix(".txt").read_text().strip()
        assert caption.startswith("a sks shape on a ") and caption.endswith(" background"), caption


# Its own limit: the run's 600 s (measured 174-208 s on two threads, 283 s on one), then two judged evaluations.
@pytest.mark.timeout(900)
@pytest.mark.slow
def test_dreambooth_lora_learns_a_new_subject_through_accelerate_launch(tmp_path, pipe, judge, launch,
                                                                         training_threads):
    """The CLI as users run it, on the shipped model and default settings: the judge sees the
    subject in most trigger-word images after training and in almost none before."""
    data = tmp_path / "crescent"
    write_subject_images("crescent", str(data), count=5, seed=11)
    out = tmp_path / "lora"
    from adaprelora.tiny_t2i.personalise import DREAMBOOTH_DEFAULTS as d

    args = ["--pretrained_model_name_or_path", TINY_SD_DIR, "--instance_data_dir", str(data),
            "--instance_prompt", trigger_prompt("white"), "--output_dir", str(out), "--resolution", "64",
            "--train_batch_size", str(d["train_batch_size"]), "--max_train_steps", str(d["max_train_steps"]),
            "--learning_rate", str(d["learning_rate"]), "--rank", str(d["rank"]), "--lr_scheduler", d["lr_scheduler"],
            "--lr_warmup_steps", "0", "--seed", "0", "--report_to", "none", "--checkpointing_steps", "100000"]
    if d["train_text_encoder"]:
        args.append("--train_text_encoder")
    if d.get("snr_gamma"):
        args += ["--snr_gamma", str(d["snr_gamma"])]
    if d["with_prior_preservation"]:
        write_class_images(str(tmp_path / "class"), d["num_class_images"])  # captioned scenes, as the app does
        args += ["--with_prior_preservation", "--class_data_dir", str(tmp_path / "class"), "--class_prompt",
                 d["class_prompt"], "--num_class_images", str(d["num_class_images"]),
                 "--class_caption_dropout_rate", str(d["class_caption_dropout_rate"])]
    launch(args, threads=training_threads, timeout=600)
    before = evaluate_lora(pipe, judge, "crescent", per_background=2, prior_prompts=14)
    after = evaluate_lora(pipe, judge, "crescent", lora_dir=str(out), per_background=2, prior_prompts=14)
    print("before", {k: v for k, v in before.items() if k != "images"})
    print("after", {k: v for k, v in after.items() if k != "images"})
    assert before["subject_fidelity"] <= 0.15, before
    assert after["subject_fidelity"] >= SUBJECT_FIDELITY_MIN, after
    assert after["similarity"] > before["similarity"] + SIMILARITY_GAIN_MIN, (before, after)
    assert after["prior"] >= PRIOR_MIN, after  # ordinary prompts still drawn


# Measured with these seeds on the shipped weights and defaults (crescent; batch 8, prior
# preservation on captioned scenes with class caption dropout 0.2, min-SNR-5): fidelity 0.00 -> 0.79,
# judge-embedding similarity 0.719 -> 0.928, all-three on ordinary prompts 1.00 -> 0.93 (14 images
# each). On the model's earlier weights: 0.86, 0.921 and 0.93; there, without min-SNR 0.79, 0.904 and
# 1.00, and before the class caption dropout (batch 4) 0.43, 0.801 and 0.43.
SUBJECT_FIDELITY_MIN = 0.5
SIMILARITY_GAIN_MIN = 0.08
PRIOR_MIN = 0.7
