"""The kohya / ModelSpec header keys of the exported LoRA files, each checked against how
kohya-ss/sd-scripts writes it (train_network.py's metadata, library/sai_model_spec.py,
train_util.precalculate_safetensors_hashes), plus one real training run's files."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from adaprelora.training.dreambooth.data import ImageRecord
from adaprelora.training.dreambooth.family import ModelFamily, detect_family
from adaprelora.training.dreambooth.kohya_metadata import (
    base_model_metadata,
    dataset_metadata,
    kohya_hashes,
    modelspec_metadata,
    tag_frequency,
)

SD15_UNET = {"cross_attention_dim": 768, "addition_embed_type": None}
SD15_TE = {"hidden_size": 768}
SD2_UNET = {"cross_attention_dim": 1024, "addition_embed_type": None}
SD2_TE = {"hidden_size": 1024}
SDXL_UNET = {"cross_attention_dim": 2048, "addition_embed_type": "text_time"}


def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


@pytest.mark.parametrize(
    "parts, version, v2, architecture, implementation, prediction",
    [
        (dict(unet_config=SD15_UNET, text_encoder_config=SD15_TE, prediction_type="epsilon",
              pipeline_class="StableDiffusionPipeline"),
         "sd_v1", "False", "stable-diffusion-v1/lora", "diffusers", "epsilon"),
        (dict(unet_config=SD2_UNET, text_encoder_config=SD2_TE, prediction_type="epsilon"),
         "sd_v2", "True", "stable-diffusion-v2-512/lora", "diffusers", "epsilon"),
        (dict(unet_config=SD2_UNET, text_encoder_config=SD2_TE, prediction_type="v_prediction"),
         "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "diffusers", "v"),
        (dict(unet_config={"cross_attention_dim": 768}, text_encoder_config=SD2_TE),  # text encoder decides
         "sd_v2", "True", "stable-diffusion-v2-512/lora", "diffusers", "epsilon"),
        (dict(unet_config=SDXL_UNET, text_encoder_config=SD15_TE, pipeline_class="StableDiffusionXLPipeline"),
         "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora",
         "https://github.com/Stability-AI/generative-models", "epsilon"),
        (dict(unet_config=SDXL_UNET), "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora",
         "https://github.com/Stability-AI/generative-models", "epsilon"),
    ],
    ids=["sd1.5", "sd2-512", "sd2-768-v", "sd2-by-text-encoder", "sdxl-pipeline", "sdxl-by-unet"],
)
def test_base_model_keys_match_kohya_for_v1_v2_and_xl(parts, version, v2, architecture, implementation, prediction):
    kind = detect_family(**parts)
    assert base_model_metadata(kind) == {"ss_v2": v2, "ss_base_model_version": version}
    spec = modelspec_metadata(kind, title="my-lora", resolution=768, timestamp=1_700_000_000.7,
                              trigger_phrase="a photo of sks dog")
    assert spec["modelspec.architecture"] == architecture
    assert spec["modelspec.implementation"] == implementation
    assert spec["modelspec.prediction_type"] == prediction


def test_one_family_rule_for_folders_hub_ids_and_the_app(tiny_sd, tiny_sdxl, tmp_path):
    """`detect_family` reads a local pipeline's configs (and `model_index.json`), falls back on a
    Hub id's name only when nothing can be read, and the app's label says the same."""
    import shutil

    from adaprelora.app.defaults import FAMILY_SD1, FAMILY_SD2, FAMILY_SDXL, model_family
    from adaprelora.tiny_t2i import TINY_SD_DIR

    assert detect_family(TINY_SD_DIR) == ModelFamily()  # the built-in model is SD 1.x-like
    assert detect_family(tiny_sd) == ModelFamily()
    assert detect_family(tiny_sdxl) == ModelFamily(sdxl=True)
    # Without model_index.json the UNet's added conditioning still tells SDXL; without both, the
    # second text encoder's folder does.
    bare = tmp_path / "bare-xl"
    shutil.copytree(tiny_sdxl, bare)
    (bare / "model_index.json").unlink()
    assert detect_family(str(bare), hub=False).sdxl
    (bare / "unet" / "config.json").unlink()
    assert detect_family(str(bare), hub=False).sdxl
    # A v-prediction SD 2.x folder: OpenCLIP's 1024-wide cross-attention, the scheduler's prediction type.
    sd2 = tmp_path / "sd2"
    for part, config in (("unet", SD2_UNET), ("text_encoder", SD2_TE),
                         ("scheduler", {"prediction_type": "v_prediction"})):
        (sd2 / part).mkdir(parents=True)
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        (sd2 / part / name).write_text(json.dumps(config))
    assert detect_family(str(sd2)) == ModelFamily(v2=True, v_parameterization=True)
    # Hub ids offline: by name.
    assert detect_family("stabilityai/stable-diffusion-xl-base-1.0", hub=False).sdxl
    assert detect_family("stabilityai/stable-diffusion-2-1", hub=False) == ModelFamily(v2=True)
    assert detect_family("stable-diffusion-v1-5/stable-diffusion-v1-5", hub=False) == ModelFamily()
    # Loaded configs win over the name.
    assert detect_family("some/xl-named-model", unet_config=SD15_UNET, hub=False) == ModelFamily()

    labels = {path: model_family(path) for path in (TINY_SD_DIR, tiny_sdxl, str(sd2),
                                                    "stabilityai/stable-diffusion-2-1")}
    assert labels == {TINY_SD_DIR: FAMILY_SD1, tiny_sdxl: FAMILY_SDXL, str(sd2): FAMILY_SD2,
                      "stabilityai/stable-diffusion-2-1": FAMILY_SD2}


def test_modelspec_keys_are_written_as_kohya_writes_them():
    spec = modelspec_metadata(ModelFamily(), title="sks_dog", resolution=512, timestamp=1_700_000_000.7,
                              trigger_phrase="a photo of sks dog")
    assert spec == {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "sks_dog",
        "modelspec.resolution": "512x512",
        # kohya: datetime.fromtimestamp(int(timestamp)).isoformat(), local time without microseconds
        "modelspec.date": dt.datetime.fromtimestamp(1_700_000_000).isoformat(),
        "modelspec.prediction_type": "epsilon",
        "modelspec.trigger_phrase": "a photo of sks dog",
    }
    assert "modelspec.trigger_phrase" not in modelspec_metadata(ModelFamily(), title="t", resolution=512,
                                                                timestamp=0, trigger_phrase=None)


def test_tag_frequency_counts_comma_separated_tags_per_folder_like_kohya():
    # kohya's set_tag_frequency: split on ",", strip, skip empty, lower-case; one dict per folder.
    freq = tag_frequency([("10_dog", ["sks dog, Grass,", "sks dog,  grass , sunny", ""]), ("cls", ["a dog"])])
    assert freq == {"10_dog": {"sks dog": 2, "grass": 2, "sunny": 1}, "cls": {"a dog": 1}}


def test_dataset_keys_count_images_and_use_the_prompt_for_uncaptioned_images(tmp_path):
    inst = [ImageRecord(str(tmp_path / "toy" / "a.png"), "sks toy, red table"), ImageRecord(str(tmp_path / "toy" / "b.png"))]
    cls = [ImageRecord(str(tmp_path / "class" / f"{i}.png")) for i in range(3)]
    meta = dataset_metadata(inst, "a photo of sks toy", cls, "a photo of a toy")
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == ("2", "3")
    assert json.loads(meta["ss_tag_frequency"]) == {
        "toy": {"sks toy": 1, "red table": 1, "a photo of sks toy": 1}, "class": {"a photo of a toy": 3}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"toy": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"class": {"n_repeats": 1, "img_count": 3}}


def test_hashes_are_kohyas_sha256_of_the_tensor_bytes_and_legacy_window(tmp_path):
    # Over 1.1 MiB so that kohya's legacy window (0x10000 bytes at 0x100000) holds tensor data.
    gen = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(4, 80_000, generator=gen),
               "lora_unet_x.lora_up.weight": torch.randn(320, 4, generator=gen), "lora_unet_x.alpha": torch.tensor(4.0)}
    meta = {"ss_network_dim": "4", "ss_output_name": "x", "modelspec.title": "changes nothing"}
    model_hash, legacy = kohya_hashes(tensors, meta)

    # kohya hashes the file written with the ss_* keys only; write that file for real and hash it.
    path = tmp_path / "ss_only.safetensors"
    save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert model_hash == hashlib.sha256(raw[8 + header_len:]).hexdigest()
    assert legacy == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8] and len(legacy) == 8
    assert kohya_hashes(tensors, {**meta, "modelspec.title": "other"}) == (model_hash, legacy), \
        "only ss_* keys take part"
    small_legacy = kohya_hashes({"a": torch.zeros(2)}, {})[1]
    assert small_legacy == hashlib.sha256(b"").hexdigest()[:8], "a file under 1 MiB hashes an empty window"


# ------------------------------------------------------------------------------------------------
# A real run: every key in both files' headers
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from adaprelora.testing.tiny_sd import tiny_sd_pipeline_dir
    from adaprelora.training.dreambooth import TrainConfig, train

    root = tmp_path_factory.mktemp("kohya-meta")
    folder = root / "10_toy"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "img0.txt").write_text("sks toy, red table")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = time.time()
        config = TrainConfig(pretrained_model_name_or_path=tiny_sd_pipeline_dir(), instance_data_dir=str(folder),
                             instance_prompt="a photo of sks toy", output_dir=str(root / "out"),
                             output_name="sks_toy", resolution=32, train_batch_size=1, max_train_steps=1, seed=0,
                             report_to="none", num_validation_images=0)
        events = list(train(config))
        after = time.time()
    finally:
        torch.set_num_threads(previous)
    return events[-1], before, after


@pytest.mark.timeout(300)
def test_trained_files_carry_every_kohya_and_modelspec_key(trained_run):
    last, before, after = trained_run
    kohya_path, diffusers_path = last.outputs["kohya"], last.outputs["diffusers"]
    for path in (kohya_path, diffusers_path):
        meta = _metadata(path)
        assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
        assert meta["ss_network_module"] == "networks.lora"
        assert meta["ss_sd_model_name"] == "pipeline", "kohya writes a local model's folder name"
        assert before <= float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"]) <= after
        assert meta["ss_resolution"] == "(32, 32)", "kohya writes str() of its (width, height) tuple"
        assert meta["ss_num_train_images"] == "3" and meta["ss_num_reg_images"] == "0"
        assert json.loads(meta["ss_tag_frequency"]) == {
            "10_toy": {"sks toy": 1, "red table": 1, "a photo of sks toy": 2}}
        assert meta["modelspec.sai_model_spec"] == "1.0.0"
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert meta["modelspec.implementation"] == "diffusers"
        assert meta["modelspec.title"] == "sks_toy" and meta["modelspec.resolution"] == "32x32"
        assert meta["modelspec.trigger_phrase"] == "a photo of sks toy"
        assert dt.datetime.fromisoformat(meta["modelspec.date"]).timestamp() <= after
        assert all(isinstance(v, str) for v in meta.values())

    meta = _metadata(kohya_path)
    raw = open(kohya_path, "rb").read()
    header_len = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + header_len:]).hexdigest(), \
        "the model hash is the SHA-256 of the file's tensor bytes"
    assert meta["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8], "a small file's legacy window is empty"
