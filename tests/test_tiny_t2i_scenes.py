"""The scene generator, the tokenizer and the judge's training code of the built-in model, and the
from-scratch training script run for a handful of steps (so it keeps working; it never retrains)."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adaprelora.tiny_t2i import scenes
from adaprelora.tiny_t2i.models import build_tokenizer, vocabulary_words
from adaprelora.tiny_t2i.train import caption_for_training

ROOT = Path(__file__).resolve().parents[1]


def test_scenes_are_reproducible_from_a_seed():
    a = [np.asarray(scenes.render(s)) for s in scenes.scenes(3, 20)]
    b = [np.asarray(scenes.render(s)) for s in scenes.scenes(3, 20)]
    c = [np.asarray(scenes.render(s)) for s in scenes.scenes(4, 20)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_training_scenes_never_hold_a_held_out_pair_nor_a_subject():
    data = list(scenes.scenes(0, 5000))
    assert not any(scenes.is_held_out(s.shape, s.colour) for s in data)
    assert not any(s.shape in scenes.SUBJECTS for s in data)
    assert {s.shape for s in data} == set(scenes.SHAPES)
    assert all(s.colour != s.background for s in data)
    held = list(scenes.scenes(0, 500, held_out=True))
    assert all(scenes.is_held_out(s.shape, s.colour) for s in held)


def test_the_generator_has_the_variety_asked_for():
    assert len(scenes.SHAPES) >= 5 and len(scenes.COLOURS) >= 6 and len(scenes.SUBJECTS) >= 4
    assert not set(scenes.SHAPES) & set(scenes.SUBJECTS)


def test_shape_is_drawn_in_its_colour_on_its_background():
    scene = scenes.Scene("square", "red", "blue", 0.5, 0.5, 0.35, 0.0)
    arr = np.asarray(scenes.render(scene)).astype(int)
    assert np.abs(arr[32, 32] - np.array(scenes.COLOURS["red"])).max() < 4, "centre is the shape's colour"
    assert np.abs(arr[1, 1] - np.array(scenes.COLOURS["blue"])).max() < 4, "corner is the background"


def test_every_shape_renders_differently():
    base = dict(colour="white", background="black", cx=0.5, cy=0.5, radius=0.35, angle=0.0)
    masks = {s: np.asarray(scenes.render(scenes.Scene(s, **base)).convert("L")) > 128 for s in scenes.ALL_SHAPES}
    for a in scenes.ALL_SHAPES:
        assert 0.05 < masks[a].mean() < 0.7, a
        for b in scenes.ALL_SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).mean() > 0.02, (a, b)


def test_subject_images_share_colour_and_vary_background():
    views = scenes.subject_scenes("heart", 5, seed=1)
    assert {v.colour for v in views} == {scenes.SUBJECT_COLOURS["heart"]}
    assert len({v.background for v in views}) == 5


def test_tokenizer_makes_every_caption_word_one_token():
    tok = build_tokenizer()
    for word in vocabulary_words():
        assert tok.tokenize(word) == [word + "</w>"], word
    ids = tok("a purple diamond on a yellow background").input_ids
    assert len(ids) == 2 + 7
    assert tok.tokenize("dog")  # any other text still tokenizes, into byte pieces


def test_caption_variants_cover_guidance_generic_noun_and_triggers():
    rng = random.Random(0)
    scene = scenes.Scene("star", "red", "green")
    caps = [caption_for_training(scene, rng) for _ in range(2000)]
    assert 0.07 < caps.count("") / len(caps) < 0.13
    assert any(" shape on " in c for c in caps)
    assert any(any(t in c.split() for t in scenes.TRIGGER_WORDS) for c in caps)
    assert caps.count("a red star on a green background") / len(caps) > 0.5


@pytest.mark.slow
def test_train_script_runs_a_few_steps_into_a_temporary_folder(tmp_path, training_threads):
    out = tmp_path / "tiny"
    threads = str(training_threads)  # 24 s a run on two, 38 s on one
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny_sd.py"), "--quick", "--threads", threads,
                           "--attention_at_16", "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("model_index.json", "README.md", "samples.png", "judge/judge.safetensors", "unet/config.json"):
        assert (out / name).exists(), name
    # The slower layout (attention at 16 x 16 too) was built and described; the default is the shipped one's.
    import json

    from adaprelora.tiny_t2i.models import build_unet

    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["down_block_types"][0] == "CrossAttnDownBlock2D" and config["up_block_types"][-1] == "CrossAttnUpBlock2D"
    assert "at all three levels" in (out / "README.md").read_text()
    shipped = json.loads((ROOT / "assets" / "tiny-sd" / "unet" / "config.json").read_text())
    assert list(build_unet().config.down_block_types) == shipped["down_block_types"]
    assert list(build_unet().config.up_block_types) == shipped["up_block_types"]
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert len(pipe.tokenizer) == len(build_tokenizer())

    # A later stage that only trains the decoder: UNet, text encoder and VAE encoder come back unchanged.
    stage2 = tmp_path / "stage2"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny_sd.py"), "--quick", "--threads", threads,
                           "--init_from", str(out), "--unet_steps", "0", "--vae_decoder_steps", "2", "--judge_steps", "0",
                           "--output_dir", str(stage2)], capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = (load_file(str(d / "vae" / "diffusion_pytorch_model.safetensors")) for d in (out, stage2))
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(("decoder.", "post_quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    for part in ("unet", "text_encoder"):
        w0, w1 = (load_file(str(next((d / part).glob("*.safetensors")))) for d in (out, stage2))
        assert all(torch.equal(w0[k], w1[k]) for k in w0), part
    assert "VAE decoder steps, encoder frozen" in (stage2 / "README.md").read_text()


def test_train_script_refuses_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny_sd.py"), "--quick",
                           "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "non-empty folder" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("limit, message", [("-1", "must be positive"), ("0.0001", "ran out before the UNet's first step")])
@pytest.mark.slow
def test_train_script_time_limit_errors_are_one_line(tmp_path, limit, message):
    """A negative limit, or one spent before the UNet starts: one `error:` line, exit 2, no folder written."""
    out = tmp_path / "model"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny_sd.py"), "--quick", "--threads", "1",
                           "--output_dir", str(out), "--time_limit_minutes", limit],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "model.tmp").exists()


@pytest.mark.parametrize("bad", ["pentagon"])
def test_unknown_shape_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="unknown shape"):
        scenes.render(scenes.Scene(bad, "red", "blue"))


@pytest.mark.slow
def test_decoder_finetuning_learns_and_leaves_the_encoder_alone():
    """The decoder-only stage lowers reconstruction error on fixed latents and touches no encoder weight."""
    from torch.nn import functional as F

    from adaprelora.tiny_t2i import models, train

    torch.manual_seed(0)
    _, images = train.make_dataset(0, 64)
    vae = models.build_vae().eval()
    encoder_before = {k: v.clone() for k, v in vae.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    means, stds = train.encode_all(vae, images)
    x = train._to_unit(images)

    def recon_error():
        with torch.no_grad():
            return F.mse_loss(vae.decode(means).sample, x).item()

    start = recon_error()
    cfg = train.TinyT2IConfig(vae_decoder_steps=60, vae_batch_size=16, vae_lr=2e-3)
    train.finetune_vae_decoder(vae, images, means, stds, cfg)
    assert recon_error() < 0.9 * start  # measured: 0.60 -> 0.47 (seed 0)
    after = vae.state_dict()
    assert all(torch.equal(after[k], v) for k, v in encoder_before.items())
    assert not any(p.requires_grad for p in vae.parameters())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learning_rate_anneals_by_steps_or_by_the_time_budget_whichever_leads(seed):
    """The UNet's schedule: warm-up, then cosine over steps, fitted to the time budget when time runs ahead."""
    from adaprelora.tiny_t2i.train import _cosine

    rng = random.Random(seed)
    total, warmup = rng.randint(300, 5000), rng.randint(1, 250)
    for _ in range(200):
        step, elapsed = rng.randrange(total), rng.random() * 1.2
        if step < warmup:
            expected = (step + 1) / warmup
        else:
            by_steps = (step - warmup) / (total - warmup)
            frac = min(1.0, max(by_steps, elapsed))
            expected = (1 + np.cos(np.pi * frac)) / 2
        assert _cosine(step, total, warmup, elapsed) == pytest.approx(expected, abs=1e-12)
    assert _cosine(total - 1, total, warmup, 0.0) < 1e-4   # the steps end annealed
    assert _cosine(warmup, total, warmup, 1.0) == 0.0      # so does a spent time budget


def test_class_images_are_captioned_ordinary_scenes(tmp_path):
    """The prior-preservation set: every image has its caption, none is a held-out pair or a subject."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "tiny_sd_class_images.py"), str(tmp_path / "cls"),
                           "--count", "12"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pngs = sorted((tmp_path / "cls").glob("*.png"))
    assert len(pngs) == 12
    for png in pngs:
        words = png.with_suffix(".txt").read_text().split()
        assert words[0] == "a" and words[-1] == "background", words
        colour, shape = words[1], " ".join(words[2:words.index("on")])
        assert shape in scenes.SHAPES and colour in scenes.COLOURS, words
        assert not scenes.is_held_out(shape, colour), words
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "tiny_sd_class_images.py"), str(tmp_path / "x"),
                          "--count", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "--count must be at least 1" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("args, message", [(["moon"], "unknown subject 'moon'"),
                                           (["heart", "--model", "nowhere"], "is not a tiny-sd folder"),
                                           (["heart", "--prior_prompts", "0"], "--prior_prompts must be 1 or more")])
def test_dreambooth_check_script_rejects_bad_input_in_one_line(args, message):
    """The measuring script (minutes per subject; the defaults' run is tests/test_tiny_t2i_model.py's)
    stops on a bad subject or model folder before loading anything."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "tiny_sd_dreambooth_check.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_model_card_scores_dreambooth_by_the_mean_over_seeds():
    from adaprelora.tiny_t2i.quality import BASE_SETTINGS, _dreambooth_md, _targets_md

    def row(settings, fidelity, background, similarity, prior):
        return {"subject": "heart", "settings": settings, "subject_fidelity": fidelity, "background": background,
                "similarity": similarity, "prior": prior}

    runs = [row(BASE_SETTINGS, 0.0, 1.0, 0.7, 0.9),
            row("defaults (seed 0)", 0.5, 1.0, 0.9, 0.81), row("defaults (seed 1)", 0.8, 0.6, 0.8, 0.63)]
    table = _dreambooth_md(runs)
    assert "| heart | **mean of the 2 LoRAs above** | 0.65 | 0.80 | 0.850 | 0.72 |" in table
    # The prior's prompt count comes from the rows (rows from before it was recorded: 28).
    assert "all-three score on 28 ordinary prompts" in table
    assert "all-three score on 96 ordinary prompts" in _dreambooth_md([dict(r, prior_prompts=96) for r in runs])
    quality = {"train": {"shape": 1.0, "colour": 1.0, "background": 1.0}, "held_out": {"all": 0.5}}
    targets = _targets_md({"quality": quality, "dreambooth": runs})
    assert "| DreamBooth (heart, mean of 2 seeds): subject fidelity | >= 0.60 | 0.65 | met |" in targets
    assert "| DreamBooth (heart, mean of 2 seeds): background asked for | >= 0.70 | 0.80 | met |" in targets
    # prior kept = mean LoRA prior / base prior = 0.72 / 0.9 = 0.80 (met); held-out 0.5 is not.
    assert "| DreamBooth (heart, mean of 2 seeds): prior kept (LoRA / base) | >= 0.80 | 0.80 | met |" in targets
    assert "| held-out combinations: all | >= 0.90 | 0.50 | not met |" in targets
    assert targets.count("DreamBooth") == 3  # one block per subject, not one per seed
