"""LoHa and LoKr through `--network_module lycoris --network_args algo=...` (lycoris_network.py).

In process, on the tiny SD UNet and text encoder: the network is lycoris-lora's own (its module
classes and tensor names), it is what the optimizer trains, it survives a checkpoint round trip,
and its file reloads with `lycoris.create_lycoris_from_weights` into a fresh model with the same
outputs; the flag checks (one `error:` line, exit 2, nothing written) through the CLI's own
`run_cli`. One `accelerate launch` run with algo=loha checks the file's keys, header, export check,
checkpoint and that the weights moved.
"""
from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch

import train_dreambooth
from adaprelora.training.errors import UserError, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(**kw):
    base = dict(network_module="lycoris", network_args=["algo=lokr", "conv_dim=2", "factor=4"], rank=4,
                effective_lora_alpha=2.0, lora_dropout=0.0)
    return types.SimpleNamespace(**{**base, **kw})


def _load(tiny_sd):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").requires_grad_(False)
    return unet, text_encoder


def _forward(unet, text_encoder, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    ids = torch.randint(0, 1000, (2, 77), generator=generator)
    hidden = text_encoder(ids)[0]
    return hidden, unet(latents, torch.tensor([10, 700]), hidden).sample


def test_lokr_network_trains_saves_and_reloads(tiny_sd, tmp_path):
    """LoKr on UNet and text encoder: LyCORIS's modules under each model, exactly the optimizer's
    tensors; one AdamW step changes the output; the file (kohya names, `.lokr_w1`) reloaded with
    create_lycoris_from_weights into fresh models reproduces it; a checkpoint round trip restores it."""
    from lycoris.modules.lokr import LokrModule
    from safetensors.torch import load_file

    from adaprelora import create_optimizer
    from adaprelora.training.dreambooth.lycoris_network import (
        LYCORIS_ATTR,
        create_lycoris_network,
        load_lycoris_state_dict,
        lycoris_state_dict,
        reload_lycoris_file,
        save_lycoris_file,
    )

    torch.manual_seed(0)
    unet, text_encoder = _load(tiny_sd)
    network = create_lycoris_network(_config(), unet, [text_encoder])
    holders = [getattr(unet, LYCORIS_ATTR), getattr(text_encoder, LYCORIS_ATTR)]
    assert all(isinstance(m, LokrModule) for h in holders for m in h.values())
    assert len(network.loras) == sum(len(h) for h in holders) > 100  # attention, MLP, ResNet convs...
    trainable = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in network.parameters()}
    optimizer = create_optimizer("adamw", torch.nn.ModuleDict({"unet": unet, "te": text_encoder}), lr=1e-2)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in trainable}
    with torch.no_grad():
        before = _forward(unet, text_encoder)[1]
    hidden, out = _forward(unet, text_encoder)
    (out.square().mean() + hidden.square().mean()).backward()
    assert all(p.grad is not None for p in trainable)
    optimizer.step()
    unet.eval(), text_encoder.eval()
    with torch.no_grad():
        hidden, trained = _forward(unet, text_encoder)
    assert (trained - before).abs().max() > 1e-3

    path = str(tmp_path / "lokr.safetensors")
    save_lycoris_file(path, [unet, text_encoder], {"ss_network_module": "lycoris.kohya"})
    keys = set(load_file(path))
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.alpha" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lokr_w1" in keys  # kohya's TE names
    fresh_unet, fresh_te = _load(tiny_sd)
    networks = reload_lycoris_file(path, fresh_unet, [fresh_te])
    assert sum(len(n.loras) for n in networks) == len(network.loras)
    with torch.no_grad():
        fresh_hidden, reloaded = _forward(fresh_unet, fresh_te)
    assert torch.allclose(reloaded, trained, atol=1e-5) and torch.allclose(fresh_hidden, hidden, atol=1e-5)

    # checkpoints: the state goes back into a network built from scratch (and a foreign key is refused)
    state = {k: v.clone() for k, v in lycoris_state_dict([unet, text_encoder]).items()}
    other_unet, other_te = _load(tiny_sd)
    create_lycoris_network(_config(), other_unet, [other_te])
    load_lycoris_state_dict([other_unet, other_te], state)
    other_unet.eval(), other_te.eval()
    with torch.no_grad():
        assert torch.allclose(_forward(other_unet, other_te)[1], trained, atol=1e-5)
    with pytest.raises(ValueError, match="does not"):
        load_lycoris_state_dict([other_unet, other_te], {**state, "lora_unet_nowhere.lokr_w1": torch.zeros(1)})


def test_lokr_sdxl_two_text_encoders(tiny_sdxl, tmp_path):
    """SDXL: LyCORIS's `lora_te1_` / `lora_te2_` networks on the two text encoders, each model holding
    its own modules, and the file reloaded into fresh models reproduces hidden states and prediction."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from adaprelora.training.dreambooth.lycoris_network import (
        LYCORIS_ATTR,
        create_lycoris_network,
        reload_lycoris_file,
        save_lycoris_file,
    )

    def load():
        return (UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet"),
                CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2"))

    def forward(unet, first, second):
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 1000, (1, 77), generator=generator)
        with torch.no_grad():
            out = second(ids, output_hidden_states=True)
            hidden = torch.cat([first(ids, output_hidden_states=True).hidden_states[-2], out.hidden_states[-2]], -1)
            cond = {"text_embeds": out.text_embeds, "time_ids": torch.tensor([[32, 32, 0, 0, 32, 32]])}
            latents = torch.randn(1, 4, 8, 8, generator=generator)
            return hidden, unet(latents, torch.tensor([500]), hidden, added_cond_kwargs=cond).sample

    torch.manual_seed(0)
    models = load()
    network = create_lycoris_network(_config(network_args=["algo=lokr", "factor=4"]), models[0], models[1:])
    counts = [len(getattr(m, LYCORIS_ATTR)) for m in models]
    assert counts[1] == counts[2] > 0 and sum(counts) == len(network.loras)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trained = forward(*models)
    path = str(tmp_path / "sdxl_lokr.safetensors")
    save_lycoris_file(path, models)
    prefixes = {k.split("_text_model_")[0] for k in load_file(path) if k.startswith("lora_te")}
    assert prefixes == {"lora_te1", "lora_te2"}
    fresh = load()
    base = forward(*fresh)
    reload_lycoris_file(path, fresh[0], fresh[1:])
    reloaded = forward(*fresh)
    for got, want, before in zip(reloaded, trained, base):
        assert (want - before).abs().max() > 1e-3 and torch.allclose(got, want, atol=1e-5)


def test_network_args_parsing():
    from adaprelora.training.dreambooth.lycoris_network import network_kwargs, parse_network_args

    args = parse_network_args(["algo=LoHa", "conv_dim=4", "conv_alpha=0.5", "dropout=0.1", "use_tucker=true",
                               "preset=attn-mlp"])
    assert args["algo"] == "LoHa"  # kept as written (the header's ss_network_args)
    assert network_kwargs(args) == {"algo": "loha", "conv_dim": 4, "conv_alpha": 0.5, "dropout": 0.1,
                                    "use_tucker": True, "preset": "attn-mlp"}
    assert parse_network_args({"algo": "lokr", "factor": 8}) == {"algo": "lokr", "factor": "8"}
    for bad, needle in ((["algo"], "not key=value"), (["=loha"], "not key=value"), (["algo=loha", "algo=lokr"], "twice"),
                        (["algo=loha", "conv_dim=two"], "integer"), (["algo=loha", "use_tucker=maybe"], "true or false"),
                        (["algo=loha", "network_dim=8"], "unknown key"), (["algo=glora"], "algo=glora"),
                        (["conv_dim=4"], "no algo"), (["algo=lokr", "factor=0"], "factor"),
                        (["algo=loha", "dropout=1.5"], "dropout"), (["algo=loha", "preset=nowhere.toml"], "preset")):
        with pytest.raises(UserError, match=needle):
            network_kwargs(parse_network_args(bad))


@pytest.mark.parametrize("extra, needles", [
    (["--network_args", "algo=diag-oft"], ["algo=diag-oft", "loha or algo=lokr"]),
    (["--network_args", "algo=loha", "conv_dim"], ["'conv_dim' is not key=value"]),
    (["--network_args", "algo=loha", "--use_dora"], ["--use_dora", "algo=loha"]),
    (["--network_args", "algo=lokr", "--optimizer", "adaprelora"], ["--optimizer adaprelora", "LoRA pairs",
                                                                     "--optimizer adamw"]),
    (["--network_args", "algo=loha", "--lora_layers", "attn-ff", "--conv_rank", "4"], ["conv_dim=N"]),
])
def test_bad_input_is_one_error_line(extra, needles, tmp_path, capsys):
    """Through the command line's parser and `run_cli`: exit 2, one `error:` line, nothing written."""
    fields = {f.name for f in dataclasses.fields(train_dreambooth.TrainConfig)}
    missing = [flag for flag in ("use_dora", "conv_rank") if f"--{flag}" in extra and flag not in fields]
    if missing:
        pytest.skip(f"--{missing[0]} is not a flag of this trainer")
    out = tmp_path / "out"
    args = ["--pretrained_model_name_or_path", str(tmp_path), "--instance_data_dir", str(tmp_path),
            "--instance_prompt", "sks", "--output_dir", str(out), "--optimizer", "adamw",
            "--network_module", "lycoris", *extra]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train_dreambooth.main(args))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not out.exists()


def test_unknown_network_module_and_stray_args(tmp_path):
    base = dict(pretrained_model_name_or_path=str(tmp_path), instance_data_dir=str(tmp_path), instance_prompt="sks",
                output_dir=str(tmp_path / "out"), optimizer="adamw")
    with pytest.raises(UserError, match="--network_module 'networks.loha' is not one of"):
        train_dreambooth.TrainConfig(network_module="networks.loha", **base).validate()
    with pytest.raises(UserError, match="add --network_module lycoris"):
        train_dreambooth.TrainConfig(network_args=["algo=loha"], **base).validate()
    config = train_dreambooth.TrainConfig(network_module="lycoris.kohya", network_args=["algo=lokr", "factor=8"],
                                          **base).validate()
    assert config.network_args == {"algo": "lokr", "factor": "8"}


@pytest.mark.slow
def test_loha_dreambooth_run(launch, tiny_sd, instance_dir, dreambooth_args, tmp_path, training_threads):
    """`accelerate launch train_dreambooth.py --network_module lycoris --network_args algo=loha`:
    LyCORIS's file (`.hada_w1_a`...) with kohya's header, no diffusers file (said in the last line),
    the export check passed, the weights moved from LoHa's zero start, and the checkpoint holds the
    same tensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "loha"
    args = dreambooth_args(tiny_sd, instance_dir, out, steps=3) + [
        "--network_module", "lycoris", "--network_args", "algo=loha", "conv_dim=2", "conv_alpha=1",
        "--optimizer", "adamw", "--learning_rate", "1e-2", "--checkpointing_steps", "2", "--output_name", "toy",
        "--report_to", "none"]
    proc = launch(args, threads=training_threads)
    last = proc.stdout.strip().splitlines()[-1]
    assert "verified: kohya file ok" in last and "no diffusers-format file" in last, last
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    path = out / "toy.safetensors"
    tensors = load_file(str(path))
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.{p}" for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")} <= set(tensors)
    assert "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a" in tensors  # conv_dim=2: the ResNet convolutions
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a"].shape[1] == 2
    assert not any(k.startswith("lora_te") for k in tensors)  # the text encoder was not trained
    # LoHa starts with hada_w2_a = 0 (no change to the model): training moved it
    moved = [k for k in tensors if k.endswith("hada_w2_a") and tensors[k].abs().max() > 0]
    assert len(moved) == len([k for k in tensors if k.endswith("hada_w2_a")]) > 50
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "loha", "conv_dim": "2", "conv_alpha": "1"}
    assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "3" and meta["sshs_model_hash"]
    checkpoint = load_file(str(out / "checkpoint-2" / "lycoris_weights.safetensors"))
    assert set(checkpoint) == set(tensors)
    card = (out / "README.md").read_text()
    assert "toy.safetensors" in card and "pytorch_lora_weights" not in card
