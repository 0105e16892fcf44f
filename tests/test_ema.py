"""EMA of the trained weights: `adaprelora.training.ema.ParameterEMA` against a float64 reference
(decay warm-up, the start after `update_after_step`, swap in and out, saved state), and
`train_dreambooth.py --use_ema` on the tiny pipelines: the samples, the validation loss and both
files hold the EMA weights, every checkpoint its state, a resumed run equals the uninterrupted one
bit for bit, `--ema_save_raw` writes the raw weights, and bad flags are one `error:` line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adaprelora.training.ema import EMA_STATE_FILE, ParameterEMA, load_ema, save_ema
from adaprelora.training.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------
# The maths, on random tensors
# ------------------------------------------------------------------------------------------------
def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    """A LoRA pair's shapes, a conv factor and a bf16 vector (averaged in fp32 all the same)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [((4, 16), torch.float32), ((32, 4), torch.float32), ((4, 8, 3, 3), torch.float32), ((12,), torch.bfloat16)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s, dtype in shapes]


def _step(params, g) -> None:
    """A stand-in for an optimizer step: every weight moves by a random amount."""
    with torch.no_grad():
        for p in params:
            p.add_((0.3 * torch.randn(p.shape, generator=g)).to(p.dtype))


def _reference_decay(n: int, decay: float, warmup: str, after: int) -> float:
    t = n - after - 1
    if t <= 0:
        return 0.0
    return decay if warmup == "none" else min(decay, (1 + t) / (10 + t))


@pytest.mark.parametrize("decay, warmup, after", [(0.95, "ratio", 0), (0.2, "ratio", 3), (0.9, "none", 2)])
def test_update_equals_a_float64_reference(decay, warmup, after):
    params = _params()
    ema = ParameterEMA(params, decay, warmup=warmup, update_after_step=after)
    reference = [p.detach().double().clone() for p in params]  # the average starts at the weights
    g = torch.Generator().manual_seed(1)
    used = []
    for n in range(1, 31):
        _step(params, g)
        used.append(ema.update())
        d = _reference_decay(n, decay, warmup, after)
        reference = [d * r + (1 - d) * p.detach().double() for r, p in zip(reference, params)]
        if n == after + 1:  # the first averaging update copies the weights exactly
            assert all(torch.equal(s, p.detach().float()) for s, p in zip(ema.shadow, params))
    assert used == [_reference_decay(n, decay, warmup, after) for n in range(1, 31)]
    if warmup == "ratio" and decay == 0.2:
        assert used[-1] == 0.2 and used[after + 1] < 0.2  # capped at --ema_decay after a warm-up below it
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    for s, r, p in zip(ema.shadow, reference, params):
        torch.testing.assert_close(s.double(), r, rtol=1e-5, atol=1e-6)
        assert (s.double() - p.detach().double()).abs().max() > 1e-3  # an average, not the last weights
    assert ema.num_updates == 30 and ema.last_decay == used[-1]


def test_swap_in_and_out_restores_the_raw_weights_bit_for_bit():
    params = _params()
    ema = ParameterEMA(params, 0.9)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        _step(params, g)
        ema.update()
    raw = [p.detach().clone() for p in params]
    with ema.swapped_in():
        for p, s in zip(params, ema.shadow):
            assert torch.equal(p.detach(), s.to(p.dtype))
        assert not torch.equal(params[0].detach(), raw[0])
        with pytest.raises(RuntimeError):
            ema.update()  # the parameters hold the average now
    assert all(torch.equal(p.detach(), r) for p, r in zip(params, raw))
    with pytest.raises(ValueError), ema.swapped_in():  # also restored when the block raises
        raise ValueError("boom")
    assert all(torch.equal(p.detach(), r) for p, r in zip(params, raw))
    assert all(p.requires_grad for p in params)


def test_saved_state_continues_the_same_average(tmp_path):
    params = _params()
    names = [f"p{i}" for i in range(len(params))]
    a = ParameterEMA(params, 0.9, names=names)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        _step(params, g)
        a.update()
    save_ema(a, str(tmp_path))
    b = ParameterEMA(params, 0.9, names=names)  # a fresh one, as a resumed run makes
    assert load_ema(b, str(tmp_path)) and b.num_updates == 4
    for _ in range(3):
        _step(params, g)
        assert a.update() == b.update()
    assert all(torch.equal(x, y) for x, y in zip(a.shadow, b.shadow))
    assert not load_ema(b, str(tmp_path / "empty"))  # no file: False, nothing changed
    other = ParameterEMA(params[:3], 0.9, names=names[:3])
    with pytest.raises(ValueError, match="p3"):
        load_ema(other, str(tmp_path))
    with pytest.raises(ValueError):
        ParameterEMA(params, 1.0)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def _config(tiny_model, instance_dir, out, **kw):
    from adaprelora.training.dreambooth import TrainConfig

    base = dict(pretrained_model_name_or_path=tiny_model, instance_data_dir=instance_dir,
                instance_prompt="a photo of sks toy", output_dir=str(out), resolution=32, train_batch_size=1,
                seed=0, mixed_precision="no", report_to="none")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("kw, flag", [(dict(ema_decay=1.0), "--ema_decay"), (dict(ema_decay=0.0), "--ema_decay"),
                                      (dict(ema_decay=-0.5), "--ema_decay"), (dict(ema_warmup="linear"), "--ema_warmup"),
                                      (dict(ema_update_after_step=-1), "--ema_update_after_step")])
def test_bad_ema_settings_name_the_flag(kw, flag, instance_dir, tmp_path):
    with pytest.raises(UserError, match=flag):
        _config("model", instance_dir, tmp_path, use_ema=True, **kw).validate()


def test_ema_flags_without_use_ema_warn(instance_dir, tmp_path):
    with pytest.warns(UserWarning, match="--ema_decay, --ema_save_raw have no effect without --use_ema"):
        _config("model", instance_dir, tmp_path, ema_decay=0.99, ema_save_raw=True).validate()


@pytest.mark.slow
def test_the_cli_refuses_a_decay_outside_0_1_in_one_line(dreambooth_args, instance_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "train_dreambooth.py"),
                           *dreambooth_args("model", instance_dir, out, 2), "--use_ema", "--ema_decay", "1.5"],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT),
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: --ema_decay must be between 0 and 1 (exclusive; e.g. 0.999), got 1.5"], proc.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# Training with --use_ema (tiny SD in process, then accelerate launch)
# ------------------------------------------------------------------------------------------------
def _peft_to_diffusers(key: str) -> str:
    """The diffusers file's name of a UNet LoRA tensor named as PEFT names the parameter."""
    return key.replace(".lora_A.default.weight", ".lora.down.weight").replace(".lora_B.default.weight",
                                                                             ".lora.up.weight")


def _ema_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's EMA, keyed as the diffusers file keys its UNet tensors."""
    return {_peft_to_diffusers(k): v for k, v in load_file(str(checkpoint / EMA_STATE_FILE)).items()}


def _header(path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def _unet_lora(models) -> dict[str, torch.Tensor]:
    return {f"unet.{_peft_to_diffusers(n)}": p.detach().clone() for n, p in models.unet.named_parameters()
            if p.requires_grad}


EMA_RUN = dict(max_train_steps=4, checkpointing_steps=1, use_ema=True, ema_decay=0.2, ema_save_raw=True,
               learning_rate=1e-2, validation_split=0.34, validation_loss_steps=2, validation_prompt="sks toy",
               num_validation_images=1, validation_steps=2, validation_inference_steps=1)


@pytest.mark.slow
def test_samples_loss_and_files_use_the_ema_and_a_resume_is_exact(tiny_sd, instance_dir, tmp_path, monkeypatch):
    from adaprelora.training.dreambooth import train, trainer
    from adaprelora.training.dreambooth.validation_loss import ValidationLossSet

    seen = {"loss": [], "samples": []}  # the UNet's LoRA weights whenever the loss or the samples are made
    evaluate, write_samples = ValidationLossSet.evaluate, trainer.write_validation_images

    def spy_evaluate(self, models):
        seen["loss"].append(_unet_lora(models))
        return evaluate(self, models)

    def spy_samples(cfg, acc, models, step):
        seen["samples"].append((step, _unet_lora(models)))
        return write_samples(cfg, acc, models, step=step)

    monkeypatch.setattr(ValidationLossSet, "evaluate", spy_evaluate)
    monkeypatch.setattr(trainer, "write_validation_images", spy_samples)
    straight = tmp_path / "straight"
    events = list(train(_config(tiny_sd, instance_dir, straight, **EMA_RUN)))
    last = events[-1]
    assert last.done and last.step == 4
    assert "verified: diffusers file ok, kohya file ok" in last.outputs["verified"]  # checked against the EMA
    assert last.outputs["ema"] == {"decay": 0.2, "updates": 4, "last_decay": 0.2}

    # The exported file is the float64 recursion over the raw weights of steps 1..4 (the checkpoints'),
    # and exactly the EMA state of checkpoint-4; the raw file is exactly the last step's weights.
    exported = load_file(last.outputs["diffusers"])
    raw = [load_file(str(straight / f"checkpoint-{k}" / "pytorch_lora_weights.safetensors")) for k in range(1, 5)]
    assert exported.keys() == raw[0].keys() and all(k.startswith("unet.") for k in exported)
    reference = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in exported.items()}
    for n, weights in enumerate(raw, 1):
        d = _reference_decay(n, 0.2, "ratio", 0)
        reference = {k: d * reference[k] + (1 - d) * weights[k].double() for k in reference}
    ema_state = _ema_state(straight / "checkpoint-4")
    raw_file = load_file(last.outputs["diffusers_raw"])
    for key, value in exported.items():
        torch.testing.assert_close(value.double(), reference[key], rtol=1e-5, atol=1e-7)
        assert torch.equal(value, ema_state[key]) and torch.equal(raw_file[key], raw[-1][key])
    assert any(not torch.equal(exported[k], raw_file[k]) for k in exported)
    assert json.loads(_header(last.outputs["kohya"])["adaprelora_ema"])["weights"] == "ema"
    assert json.loads(_header(last.outputs["kohya_raw"])["adaprelora_ema"]) == {
        "weights": "raw", "decay": 0.2, "warmup": "ratio", "update_after_step": 0, "updates": 4, "last_decay": 0.2}
    assert os.path.isfile(straight / f"{straight.name}_raw.safetensors")

    # Samples and the validation loss saw the EMA weights: at step 2 those of checkpoint-2's EMA state.
    ema_2 = _ema_state(straight / "checkpoint-2")
    raw_2 = raw[1]
    assert [step for step, _ in seen["samples"]] == [2, 4] and len(seen["loss"]) == 3  # steps 0, 2 and 4
    for weights in (seen["samples"][0][1], seen["loss"][1]):
        assert all(torch.equal(v, ema_2[k]) for k, v in weights.items())
        assert any(not torch.equal(v, raw_2[k]) for k, v in weights.items())
    assert all(torch.equal(v, exported[k]) for k, v in seen["samples"][1][1].items())
    assert all(torch.equal(v, exported[k]) for k, v in seen["loss"][2].items())

    # Steps 3 and 4 resumed from checkpoint-2 give the same EMA, bit for bit.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    events = list(train(_config(tiny_sd, instance_dir, resumed, resume_from_checkpoint="latest", **EMA_RUN)))
    assert any("resumed the EMA of the weights (2 updates)" in e.message for e in events)
    again = load_file(events[-1].outputs["diffusers"])
    assert again.keys() == exported.keys()
    assert all(torch.equal(again[k], exported[k]) for k in exported)
    assert all(torch.equal(v, ema_state[k]) for k, v in _ema_state(resumed / "checkpoint-4").items())

    # A checkpoint saved without --use_ema resumes with a warning, the EMA starting from its weights.
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copytree(straight / "checkpoint-4", plain / "checkpoint-4")
    (plain / "checkpoint-4" / EMA_STATE_FILE).unlink()
    events = list(train(_config(tiny_sd, instance_dir, plain, resume_from_checkpoint="latest", max_train_steps=4,
                                use_ema=True, skip_export_check=True)))
    assert any("checkpoint-4 holds no EMA of the weights" in w for e in events for w in e.warnings)
    assert events[-1].outputs["ema"]["updates"] == 0
    assert all(torch.equal(v, raw[-1][k]) for k, v in load_file(events[-1].outputs["diffusers"]).items())


@pytest.mark.slow
def test_accelerate_launch_writes_the_ema_weights(launch, dreambooth_args, tiny_sd, instance_dir, tmp_path):
    """As users run it: the EMA kept on the CPU, both files equal to the EMA state the last checkpoint
    holds, reloaded by the export check, and the raw weights beside them."""
    out = tmp_path / "toy-lora"
    proc = launch(dreambooth_args(tiny_sd, instance_dir, out, 3)
                  + ["--use_ema", "--ema_decay", "0.5", "--ema_update_after_step", "1", "--ema_cpu", "--ema_save_raw",
                     "--checkpointing_steps", "3", "--optimizer", "adamw", "--learning_rate", "1e-2",
                     "--report_to", "none"])
    assert "verified: diffusers file ok, kohya file ok (max diff" in proc.stdout.strip().splitlines()[-1]
    assert "the files hold the EMA of the weights (3 updates, decay 0.1818 at the last)" in proc.stderr
    ema = _ema_state(out / "checkpoint-3")
    exported = load_file(str(out / "pytorch_lora_weights.safetensors"))
    raw = load_file(str(out / "checkpoint-3" / "pytorch_lora_weights.safetensors"))
    assert exported.keys() == ema.keys() == raw.keys()
    assert all(torch.equal(exported[k], ema[k]) for k in exported)
    assert any(not torch.equal(exported[k], raw[k]) for k in exported)
    assert all(torch.equal(v, raw[k]) for k, v in load_file(str(out / "pytorch_lora_weights_raw.safetensors")).items())
    kohya, kohya_raw = (load_file(str(out / name)) for name in ("toy-lora.safetensors", "toy-lora_raw.safetensors"))
    assert kohya.keys() == kohya_raw.keys() and any(not torch.equal(kohya[k], kohya_raw[k]) for k in kohya)


@pytest.mark.slow
def test_sdxl_with_both_text_encoders_exports_the_ema(tiny_sdxl, instance_dir, tmp_path):
    """SDXL, its two text encoders trained too: every trained tensor is averaged, and the files (checked
    by reloading them into a fresh pipeline) hold the average."""
    from adaprelora.training.dreambooth import train

    out = tmp_path / "xl"
    last = list(train(_config(tiny_sdxl, instance_dir, out, max_train_steps=2, checkpointing_steps=2, use_ema=True,
                              ema_decay=0.5, train_text_encoder=True, optimizer="adamw", learning_rate=1e-2)))[-1]
    assert "verified: diffusers file ok, kohya file ok" in last.outputs["verified"]
    state = load_file(str(out / "checkpoint-2" / EMA_STATE_FILE))
    assert {k.split(".")[0] for k in state} == {"unet", "text_encoder", "text_encoder_2"}
    ema = _ema_state(out / "checkpoint-2")
    exported = load_file(last.outputs["diffusers"])
    raw = load_file(str(out / "checkpoint-2" / "pytorch_lora_weights.safetensors"))
    unet_keys = [k for k in exported if k.startswith("unet.")]
    assert unet_keys and all(torch.equal(exported[k], ema[k]) for k in unet_keys)
    assert any(not torch.equal(exported[k], raw[k]) for k in exported if k.startswith("text_encoder_2."))


@pytest.mark.slow
def test_lycoris_loha_exports_the_ema_and_the_raw_weights(tiny_sd, instance_dir, tmp_path):
    """LoHa (LyCORIS's modules under the UNet): its tensors are averaged, its one file holds the average
    (checked by the export check's reload), `_raw` the last step's tensors as the checkpoint has them."""
    pytest.importorskip("lycoris")
    from adaprelora.training.dreambooth import train

    out = tmp_path / "loha"
    last = list(train(_config(tiny_sd, instance_dir, out, max_train_steps=2, checkpointing_steps=2, use_ema=True,
                              ema_decay=0.5, ema_save_raw=True, network_module="lycoris", network_args=["algo=loha"],
                              optimizer="adamw", learning_rate=1e-2)))[-1]
    assert "kohya file ok" in last.outputs["verified"] and "diffusers_raw" not in last.outputs
    exported, raw = load_file(last.outputs["kohya"]), load_file(last.outputs["kohya_raw"])
    prefix = "unet.lycoris_network."
    ema = {k[len(prefix):]: v for k, v in load_file(str(out / "checkpoint-2" / EMA_STATE_FILE)).items()}
    assert ema and all(torch.equal(exported[k], v) for k, v in ema.items())
    assert any(not torch.equal(exported[k], raw[k]) for k in ema)
    checkpoint = load_file(str(out / "checkpoint-2" / "lycoris_weights.safetensors"))
    assert raw.keys() == checkpoint.keys() == exported.keys()
    assert all(torch.equal(raw[k], checkpoint[k]) for k in raw)
