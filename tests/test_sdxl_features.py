"""The kohya-style features together on SDXL, through `accelerate launch` as users run them: a kohya
dataset TOML (two concepts, repeats, shuffled tags), the images' alpha as the loss mask, LoKr from
`lycoris-lora`, and EMA with the raw weights saved as well. Each feature's own module tests it in
depth on SD 1.x (tests/test_dataset_config.py, test_masked_loss.py, test_lycoris.py, test_ema.py);
this run shows they work on the SDXL pipeline and with one another."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def _write_concepts(root, write_images):
    """Two concept folders of captioned images; the first concept's images have a transparent half."""
    import numpy as np
    from PIL import Image

    folders = {}
    for name, tags, count in (("toy", "sks toy, red, wooden", 2), ("mug", "zwx mug, blue, ceramic", 1)):
        folder = root / name
        for path in write_images(folder, [(64, 64)] * count, prefix=name, seed=len(name)):
            if name == "toy":
                rgb = np.asarray(Image.open(path).convert("RGB"))
                alpha = np.full(rgb.shape[:2], 255, np.uint8)
                alpha[:, : rgb.shape[1] // 2] = 0
                Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
            open(path.rsplit(".", 1)[0] + ".txt", "w").write(tags)
        folders[name] = folder
    return folders


def test_dataset_toml_alpha_mask_lokr_and_ema_on_sdxl(launch, tiny_sdxl, write_images, tmp_path, training_threads):
    from safetensors import safe_open
    from safetensors.torch import load_file

    folders = _write_concepts(tmp_path / "data", write_images)
    toml = tmp_path / "dataset.toml"
    toml.write_text(
        "[general]\nshuffle_caption = true\nkeep_tokens = 1\ncaption_extension = '.txt'\n\n"
        "[[datasets]]\nresolution = 32\nbatch_size = 1\n\n"
        f"  [[datasets.subsets]]\n  image_dir = '{folders['toy']}'\n  num_repeats = 2\n\n"
        f"  [[datasets.subsets]]\n  image_dir = '{folders['mug']}'\n")
    out = tmp_path / "out"
    proc = launch(["--pretrained_model_name_or_path", tiny_sdxl, "--dataset_config", str(toml),
                   "--output_dir", str(out), "--output_name", "combo", "--max_train_steps", "3", "--seed", "0",
                   "--mixed_precision", "no", "--report_to", "none", "--alpha_mask",
                   "--network_module", "lycoris", "--network_args", "algo=lokr", "factor=4",
                   "--optimizer", "adamw", "--learning_rate", "1e-2",
                   "--use_ema", "--ema_decay", "0.9", "--ema_save_raw"], threads=training_threads)
    last = proc.stdout.strip().splitlines()[-1]
    assert "verified: kohya file ok" in last, last  # the EMA weights, reloaded by LyCORIS, reproduce the model
    ema, raw = load_file(str(out / "combo.safetensors")), load_file(str(out / "combo_raw.safetensors"))
    lokr = [k for k in ema if k.startswith("lora_unet_") and k.endswith(".lokr_w1")]
    assert lokr and set(ema) == set(raw), sorted(ema)[:5]
    assert any(not (ema[k] == raw[k]).all() for k in ema if ema[k].is_floating_point()), "EMA equals the raw weights"
    with safe_open(str(out / "combo.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == "lokr"
    assert meta["ss_masked_loss"] == "True" and meta["ss_base_model_version"].startswith("sdxl"), meta
    dirs = json.loads(meta["ss_dataset_dirs"])
    assert {k: v["n_repeats"] for k, v in dirs.items()} == {"toy": 2, "mug": 1}, dirs
    assert json.loads(meta["adaprelora_ema"])["weights"] == "ema", meta["adaprelora_ema"]
    config = json.loads(meta["adaprelora_config"])
    assert config["alpha_mask"] and config["dataset_config"] == str(toml), config
