"""Verified exports: at the end of a run both LoRA files are loaded into a fresh base model with
diffusers' `load_lora_weights` and must reproduce the trained model; a file that does not is a loud
warning. Also the diffusers file's text-encoder layout (`text_encoder.text_model.…`)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adaprelora.testing.tiny_sd import tiny_sd_pipeline_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py, as is instance_dir


def _config(instance_dir, output_dir, **kw):
    from adaprelora.training.dreambooth import TrainConfig

    base = dict(pretrained_model_name_or_path=tiny_sd_pipeline_dir(), instance_data_dir=instance_dir,
                instance_prompt="a photo of sks toy", output_dir=str(output_dir), resolution=32, train_batch_size=1,
                max_train_steps=2, seed=0, report_to="none", learning_rate=1e-2, num_validation_images=0,
                rank=4, lora_alpha=8)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def text_encoder_run(instance_dir, tmp_path_factory):
    from adaprelora.training.dreambooth import train

    out = tmp_path_factory.mktemp("te-run") / "out"
    return list(train(_config(instance_dir, out, train_text_encoder=True, optimizer="adamw")))[-1]


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_a_run_ends_with_both_files_verified(text_encoder_run):
    last = text_encoder_run
    assert last.message.startswith("finished at step 2; verified: diffusers file ok, kohya file ok (max diff"), \
        last.message
    assert last.outputs["verified"].startswith("verified: diffusers file ok, kohya file ok (max diff")
    check = last.outputs["export_check"]
    assert check["ok"] and set(check["files"]) == {"diffusers", "kohya"}
    tolerance = check["files"]["kohya"]["tolerance"]
    assert check["lora_effect"] > 10 * tolerance, "the LoRA changes the output: the check can tell files apart"
    assert not last.warnings


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_diffusers_file_uses_the_transformers_4_text_encoder_layout_and_loads_here(text_encoder_run):
    from diffusers import StableDiffusionPipeline

    path = text_encoder_run.outputs["diffusers"]
    keys = list(load_file(path))
    te_keys = [k for k in keys if k.startswith("text_encoder.")]
    assert te_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te_keys), te_keys[:3]

    # Round trip on transformers 5 (no `text_model.` level in CLIPTextModel): every tensor lands.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_pipeline_dir())
    pipe.load_lora_weights(path.rsplit("/", 1)[0], adapter_name="mine")
    file = load_file(path)
    loaded = {n: p for n, p in pipe.text_encoder.named_parameters() if ".mine." in n}
    assert len(loaded) == len(te_keys)
    for name, param in loaded.items():
        module, which = name.split(".lora_")[0], "down" if ".lora_A." in name else "up"
        key = f"text_encoder.text_model.{module}.lora_linear_layer.{which}.weight"
        assert torch.equal(param.detach(), file[key]), name


@pytest.mark.timeout(300)
def test_skip_export_check_turns_it_off(instance_dir, tmp_path):
    from adaprelora.training.dreambooth import train

    last = list(train(_config(instance_dir, tmp_path / "out", max_train_steps=1, skip_export_check=True)))[-1]
    assert last.done and "verified" not in last.outputs and "verified" not in last.message


def _tiny_trained_models():
    """The tiny pipeline with LoRA adapters whose B is non-zero (as after training)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from adaprelora.training.dreambooth.export import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_pipeline_dir())
    common = dict(r=4, lora_alpha=8, init_lora_weights="gaussian")
    pipe.unet.add_adapter(LoraConfig(target_modules=UNET_TARGET_MODULES, **common))
    pipe.text_encoder.add_adapter(LoraConfig(target_modules=TEXT_ENCODER_TARGET_MODULES, **common))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return pipe


@pytest.mark.timeout(300)
def test_a_file_that_differs_or_does_not_load_is_a_loud_failure(instance_dir, tmp_path):
    from adaprelora.training.dreambooth.export import save_diffusers_lora, save_kohya_lora
    from adaprelora.training.dreambooth.verify import verify_exports

    pipe = _tiny_trained_models()
    cfg = _config(instance_dir, tmp_path)
    diffusers_path = save_diffusers_lora(str(tmp_path), pipe.unet, pipe.text_encoder)
    kohya_path = save_kohya_lora(str(tmp_path / "toy.safetensors"), pipe.unet, pipe.text_encoder)

    def check(files):
        return verify_exports(cfg, files, pipe.unet, pipe.text_encoder, pipe.tokenizer, dtype=torch.float32,
                              text_encoder_trained=True)

    good = check({"diffusers": diffusers_path, "kohya": kohya_path})
    assert good.ok and good.summary().startswith("verified: diffusers file ok, kohya file ok (max diff")

    # A kohya file whose alphas are wrong (the scale users would get is off by 2x).
    tensors = load_file(kohya_path)
    with safe_open(kohya_path, framework="pt") as fh:
        header = fh.metadata()
    bad_tensors = {k: v * 2 if k.endswith(".alpha") else v for k, v in tensors.items()}
    bad_path = str(tmp_path / "bad.safetensors")
    save_file(bad_tensors, bad_path, metadata=header)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    report = check({"diffusers": diffusers_path, "kohya": bad_path, "garbage": str(garbage)})
    assert not report.ok
    assert report.summary().startswith("export check FAILED: diffusers file ok, kohya file MISMATCH, garbage FAILED")
    warnings = report.warnings()
    assert len(warnings) == 2 and "kohya file does not reproduce the trained model" in warnings[0]
    assert "could not be loaded" in warnings[1]
    # The trained models are left as they were (adapters active, train/eval modes kept).
    again = check({"diffusers": diffusers_path})
    assert again.ok and again.files[0].max_diff == good.files[0].max_diff


def test_a_killed_runs_temporary_export_files_are_removed_but_nothing_else(tmp_path):
    from adaprelora.training.dreambooth.export import remove_stale_temporary_exports

    (tmp_path / ".tmp-lora-abc").mkdir()
    (tmp_path / ".tmp-lora-abc" / "pytorch_lora_weights.safetensors").write_bytes(b"half")
    (tmp_path / "toy.safetensors.tmp-123").write_bytes(b"half")
    (tmp_path / "toy.safetensors").write_bytes(b"kept")
    (tmp_path / "checkpoint-4").mkdir()
    remove_stale_temporary_exports(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "toy.safetensors"]
