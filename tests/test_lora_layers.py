"""Which layers carry LoRA (`--lora_layers`, LoCon's `--conv_rank` / `--conv_alpha`) and DoRA
(`--use_dora`): the target lists against kohya's rule, the files' key names and shapes, DoRA's
magnitude as LyCORIS reads it (float64 reference), AdaPreLoRA on the convolution pairs, the flags'
errors, and one `accelerate launch` run each on the tiny SD and SDXL pipelines whose own export
check reloads both files."""
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adaprelora.training.dreambooth.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# kohya's default LoRA (attn-ff), written independently of models.py: every Linear / 1x1 conv of
# a Transformer2DModel, by diffusers' module names.
ATTN_FF = re.compile(r"(.*\.)?attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.("
                     r"attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))")
CONV_3X3 = re.compile(r"(.*\.)?(resnets\.\d+\.conv[12]|downsamplers\.0\.conv|upsamplers\.0\.conv)")
RESNET_LINEAR_1X1 = re.compile(r"(.*\.)?resnets\.\d+\.(time_emb_proj|conv_shortcut)")
EMBEDDINGS = re.compile(r"(time_embedding|add_embedding)\.linear_[12]")


def _config(model: str, **kw) -> TrainConfig:
    return TrainConfig(pretrained_model_name_or_path=model, instance_data_dir="unused", **kw)


def _unet(model: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model, subfolder="unet")


def _names(unet, pattern) -> set[str]:
    return {name for name, _ in unet.named_modules() if pattern.fullmatch(name)}


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_presets_adapt_kohyas_modules(fixture, request):
    from adaprelora.training.dreambooth.models import (
        TEXT_ENCODER_TARGET_MODULES,
        UNET_TARGET_MODULES,
        lora_configs,
        unet_lora_targets,
    )

    unet = _unet(request.getfixturevalue(fixture))
    assert unet_lora_targets(unet, "attn") == (UNET_TARGET_MODULES, [])
    attn_ff, convs = unet_lora_targets(unet, "attn-ff")
    assert set(attn_ff) == _names(unet, ATTN_FF) and not convs
    assert any(n.endswith("ff.net.0.proj") for n in attn_ff) and any(n.endswith("proj_in") for n in attn_ff)
    locon, convs = unet_lora_targets(unet, "attn-ff", conv=True)
    assert set(convs) == _names(unet, CONV_3X3) and "down_blocks.0.resnets.0.conv1" in convs
    assert set(locon) == _names(unet, ATTN_FF) | _names(unet, CONV_3X3) | _names(unet, RESNET_LINEAR_1X1)
    every_linear = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    all_linear, _ = unet_lora_targets(unet, "all-linear")
    assert set(all_linear) == every_linear | _names(unet, ATTN_FF)  # + SD 1.x's 1x1 proj_in/proj_out
    assert _names(unet, EMBEDDINGS) <= set(all_linear)

    unet_config, encoder_config = lora_configs(_config("x", lora_layers="attn-ff", conv_rank=2, use_dora=True), unet)
    assert unet_config.rank_pattern == {n: 2 for n in convs} and unet_config.alpha_pattern == {n: 1.0 for n in convs}
    assert unet_config.use_dora and encoder_config.use_dora
    assert set(encoder_config.target_modules) == set(TEXT_ENCODER_TARGET_MODULES) | {"fc1", "fc2"}
    assert set(lora_configs(_config("x"), unet)[1].target_modules) == set(TEXT_ENCODER_TARGET_MODULES)


def _adapted(model: str, cfg: TrainConfig, seed: int = 0):
    """The pipeline's UNet and text encoder(s) with `cfg`'s adapters, every LoRA tensor (B and the
    magnitudes too) moved off its initial value so that each one shows in the outputs."""
    from diffusers import DiffusionPipeline

    from adaprelora.training.dreambooth.models import lora_configs

    pipe = DiffusionPipeline.from_pretrained(model)
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    unet_config, encoder_config = lora_configs(cfg, pipe.unet)
    pipe.unet.add_adapter(unet_config)
    for encoder in encoders:
        encoder.add_adapter(encoder_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model_ in (pipe.unet, *encoders):
            for name, param in model_.named_parameters():
                if "lora_" in name:
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return pipe.unet, encoders


def test_kohya_keys_alphas_and_dora_scale_sd(tiny_sd, tmp_path):
    """SD 1.x: kohya's names for conv and feed-forward modules, each module's own alpha, DoRA's
    magnitude as an output-axis dora_scale; loading the file back gives the same tensors."""
    from adaprelora.training.dreambooth.export.keys import kohya_tensors, peft_state_dict
    from adaprelora.training.dreambooth.export.writers import load_kohya_lora, save_kohya_lora

    cfg = _config(tiny_sd, lora_layers="attn-ff", conv_rank=2, conv_alpha=3.0, use_dora=True, rank=4, lora_alpha=2.0)
    unet, (encoder,) = _adapted(tiny_sd, cfg)
    tensors = kohya_tensors(unet, encoder)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    ff = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj"
    base = dict(unet.named_modules())
    out_channels = base["down_blocks.0.resnets.0.conv1.base_layer"].out_channels
    assert tensors[f"{conv}.lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (out_channels, 2, 1, 1)
    assert tensors[f"{conv}.dora_scale"].shape == (out_channels, 1, 1, 1)
    assert float(tensors[f"{conv}.alpha"]) == 3.0 and float(tensors[f"{ff}.alpha"]) == 2.0
    ff_out = base["down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.base_layer"].out_features
    assert tensors[f"{ff}.dora_scale"].shape == (ff_out, 1)
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale" in tensors
    assert "lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight" in tensors  # 1x1: --rank
    assert float(tensors["lora_unet_down_blocks_1_resnets_0_conv_shortcut.alpha"]) == 2.0

    fresh_unet, (fresh_encoder,) = _adapted(tiny_sd, cfg, seed=1)
    file = save_kohya_lora(str(tmp_path / "k.safetensors"), unet, encoder)
    loaded = load_kohya_lora(file, fresh_unet, fresh_encoder)
    assert "down_blocks.0.resnets.0.conv1" in loaded
    for trained, fresh in ((unet, fresh_unet), (encoder, fresh_encoder)):
        want, got = peft_state_dict(trained), peft_state_dict(fresh)
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)


def test_checkpoint_with_locon_and_dora_resumes_exactly(tiny_sd, tmp_path):
    """A LoRA-only checkpoint (the diffusers file) of conv, feed-forward, MLP and DoRA tensors loads
    back into fresh adapters bit for bit, as `--resume_from_checkpoint` does."""
    from adaprelora.training.dreambooth.checkpoints import load_lora_checkpoint
    from adaprelora.training.dreambooth.export.keys import peft_state_dict
    from adaprelora.training.dreambooth.export.writers import save_diffusers_lora

    cfg = _config(tiny_sd, lora_layers="attn-ff", conv_rank=2, conv_alpha=3.0, use_dora=True)
    unet, encoders = _adapted(tiny_sd, cfg)
    fresh_unet, fresh_encoders = _adapted(tiny_sd, cfg, seed=1)
    save_diffusers_lora(str(tmp_path), unet, encoders)
    load_lora_checkpoint(str(tmp_path), fresh_unet, fresh_encoders)
    for trained, fresh in ((unet, fresh_unet), *zip(encoders, fresh_encoders)):
        want, got = peft_state_dict(trained), peft_state_dict(fresh)
        assert want.keys() == got.keys() and any("lora_magnitude_vector" in k for k in want)
        assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])]


def test_kohya_sdxl_names_for_resnets_samplers_and_embeddings(tiny_sdxl):
    """SDXL: Stability's block names as kohya writes them (and diffusers' loader maps back)."""
    from adaprelora.training.dreambooth.export.keys import kohya_tensors

    cfg = _config(tiny_sdxl, lora_layers="all-linear", conv_rank=2)
    unet, encoders = _adapted(tiny_sdxl, cfg)
    modules = {key.split(".")[0] for key in kohya_tensors(unet, encoders)}
    # layers_per_block 2: input_blocks 1, 2 are level 0's ResNets, 3 its downsampler, 4 level 1's
    # first ResNet + attention; output_blocks 0-2 level 0 (its upsampler after the attention).
    for name in ("input_blocks_1_0_in_layers_2", "input_blocks_1_0_out_layers_3", "input_blocks_1_0_emb_layers_1",
                 "input_blocks_3_0_op", "input_blocks_4_0_skip_connection", "input_blocks_4_1_proj_in",
                 "input_blocks_4_1_transformer_blocks_0_ff_net_0_proj", "middle_block_0_in_layers_2",
                 "middle_block_2_out_layers_3", "output_blocks_2_2_conv", "output_blocks_5_0_skip_connection",
                 "time_embed_0", "time_embed_2", "label_emb_0_0", "label_emb_0_2"):
        assert f"lora_unet_{name}" in modules, name
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc2" in modules
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc2" in modules


def _dora_reference(W, b, A, B, m, scale, x, conv: bool):
    """DoRA's output from explicit float64 matrices: m * (W + scale B A) / ||W + scale B A|| (norm per
    output channel) applied to x, the bias added."""
    out = W.shape[0]
    merged = W.reshape(out, -1) + scale * (B.reshape(out, -1) @ A.reshape(A.shape[0], -1))
    merged = merged * (m.reshape(-1, 1) / merged.norm(dim=1, keepdim=True))
    if conv:
        return torch.nn.functional.conv2d(x, merged.reshape(W.shape), b, padding=1)
    return x @ merged.T + b


def test_dora_scale_is_what_lycoris_applies_float64():
    """PEFT's DoRA forward, the exported tensors loaded by LyCORIS's own module (its `get_module` /
    `make_module`, as it reads a kohya file) and the explicit float64 formula agree, for a Linear
    and a 3x3 Conv2d with their own rank and alpha."""
    from lycoris.modules import get_module, make_module
    from peft import LoraConfig, get_peft_model

    from adaprelora.training.dreambooth.export.keys import module_alphas, peft_state_dict, peft_to_kohya

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 5)
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    torch.manual_seed(0)
    net = Net().double()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=3.0, target_modules=["lin", "conv"], use_dora=True,
                                           rank_pattern={"conv": 3}, alpha_pattern={"conv": 1.5}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.3 * torch.randn_like(param))
    inner = model.base_model.model
    tensors = peft_to_kohya(peft_state_dict(inner), None, 3.0, torch.float64, alphas=module_alphas(inner))
    x_lin, x_conv = torch.randn(7, 6, dtype=torch.float64), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for name, x, conv, rank, alpha in (("lin", x_lin, False, 2, 3.0), ("conv", x_conv, True, 3, 1.5)):
        layer = getattr(inner, name)
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        m = layer.lora_magnitude_vector["default"].weight.detach()
        want = _dora_reference(base[f"{name}.weight"], base[f"{name}.bias"], A, B, m, alpha / rank, x, conv)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-12)
        key = f"lora_unet_{name}"
        assert float(tensors[f"{key}.alpha"]) == alpha
        plain = torch.nn.Conv2d(3, 4, 3, padding=1) if conv else torch.nn.Linear(6, 5)
        plain.load_state_dict({"weight": base[f"{name}.weight"].float(), "bias": base[f"{name}.bias"].float()})
        kind, params = get_module({k: v.float() for k, v in tensors.items()}, key)
        lyco = make_module(kind, params, key, plain)
        lyco.apply_to()
        with torch.no_grad():
            got = plain(x.float()).double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        plain_out = _dora_reference(base[f"{name}.weight"], base[f"{name}.bias"], A, B, m * 0 + 1, 0.0, x, conv)
        assert not torch.allclose(want, plain_out, atol=1e-3), "DoRA changes nothing here: the test could not fail"


def test_adaprelora_finds_steps_conv_pairs_and_leaves_magnitudes_to_adamw(tiny_sd):
    """On the tiny UNet with LoCon and DoRA: the 3x3 convolutions are pairs (4-D A, 1x1 B), the
    magnitudes are not; one step moves both (the magnitudes by AdamW)."""
    from adaprelora import AdaPreLoRA

    cfg = _config(tiny_sd, lora_layers="attn-ff", conv_rank=2, use_dora=True)
    unet, _ = _adapted(tiny_sd, cfg)
    unet.requires_grad_(False)
    for name, param in unet.named_parameters():
        param.requires_grad_("lora_" in name)
    opt = AdaPreLoRA(unet, lr=1e-2)
    pairs = {p.name.rsplit(".", 1)[0]: p for p in opt.pairs}
    conv = pairs["down_blocks.0.resnets.0.conv1"]
    assert conv.is_conv and conv.A.shape == (2, 32, 3, 3) and conv.B.shape[2:] == (1, 1)
    assert "down_blocks.0.downsamplers.0.conv" in pairs and "up_blocks.0.upsamplers.0.conv" in pairs
    assert not any("magnitude" in name for name in pairs)
    magnitude = dict(unet.named_parameters())["down_blocks.0.resnets.0.conv1.lora_magnitude_vector.default.weight"]
    before = {k: v.detach().clone() for k, v in (("A", conv.A), ("B", conv.B), ("m", magnitude))}
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    unet(sample, torch.tensor([500]), hidden).sample.pow(2).mean().backward()
    opt.step()
    for key, tensor in (("A", conv.A), ("B", conv.B), ("m", magnitude)):
        assert not torch.equal(tensor.detach(), before[key]), key


def test_conv_pair_step_is_the_matrix_pair_step_float64():
    """AdaPreLoRA steps a Conv2d pair (A r x in x 3 x 3, B out x r x 1 x 1) exactly as the pair of
    matrices A.reshape(r, -1), B.reshape(out, r), whose step the reference tests check."""
    from adaprelora import AdaPreLoRA

    generator = torch.Generator().manual_seed(3)
    A0 = torch.randn(2, 3, 3, 3, generator=generator, dtype=torch.float64)
    B0 = torch.randn(4, 2, 1, 1, generator=generator, dtype=torch.float64)
    G = torch.randn(4, 27, generator=generator, dtype=torch.float64)
    results = []
    for shape_a, shape_b in ((A0.shape, B0.shape), ((2, 27), (4, 2))):
        A = torch.nn.Parameter(A0.clone().reshape(shape_a))
        B = torch.nn.Parameter(B0.clone().reshape(shape_b))
        opt = AdaPreLoRA([A, B], lr=0.05, variant="sgd", stats="tangent", pairs=[(A, B, 1.0)])
        for _ in range(2):
            a, b = A.detach().reshape(2, 27), B.detach().reshape(4, 2)
            A.grad, B.grad = (b.T @ G).reshape(shape_a), (G @ a.T).reshape(shape_b)
            opt.step()
        results.append((A.detach().reshape(2, 27), B.detach().reshape(4, 2)))
    (Ac, Bc), (Am, Bm) = results
    torch.testing.assert_close(Ac, Am, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(Bc, Bm, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(Am, A0.reshape(2, 27)), "the step moved nothing: the test would pass anyway"


@pytest.mark.parametrize("flags, needle", [
    (["--conv_alpha", "2"], "--conv_alpha needs --conv_rank"),
    (["--conv_rank", "2"], "--conv_rank adapts the ResNet convolutions"),
    (["--lora_layers", "everything"], "--lora_layers"),
    (["--lora_layers", "attn-ff", "--conv_rank", "0"], "--conv_rank must be at least 1"),
    (["--lora_layers", "attn-ff", "--conv_rank", "2", "--conv_alpha", "-1"], "--conv_alpha must be positive"),
    (["--lora_alpha", "0"], "--lora_alpha must be positive"),
    (["--rank", "0"], "--rank must be at least 1"),
])
def test_bad_layer_flags_are_one_error_line(flags, needle, tiny_sd, instance_dir, dreambooth_args, tmp_path, capsys):
    import train_dreambooth
    from adaprelora.training.errors import run_cli

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train_dreambooth.main(dreambooth_args(tiny_sd, instance_dir, out, 1) + flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err and not out.exists()


def _header(path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


@pytest.mark.slow
def test_locon_dora_run_on_tiny_sd(launch, tiny_sd, instance_dir, dreambooth_args, tmp_path):
    """attn-ff + LoCon + DoRA with the text encoder through `accelerate launch`: the run's export check
    reloads both files (diffusers' `load_lora_weights`; the DoRA kohya file through diffusers'
    conversion) and finds them equal to the trained model; keys, shapes and headers as kohya /
    LyCORIS / diffusers write them; the conv pairs and the magnitudes were trained."""
    out = tmp_path / "out"
    proc = launch(dreambooth_args(tiny_sd, instance_dir, out, 2) + [
        "--lora_layers", "attn-ff", "--conv_rank", "2", "--conv_alpha", "3", "--use_dora", "--train_text_encoder",
        "--learning_rate", "1e-3", "--report_to", "none", "--num_validation_images", "0"], threads=2)
    assert "verified: diffusers file ok, kohya file ok" in proc.stdout.strip().splitlines()[-1], proc.stdout

    kohya = load_file(str(out / "out.safetensors"))
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    ff = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj"
    assert kohya[f"{conv}.lora_down.weight"].shape == (2, 32, 3, 3) and float(kohya[f"{conv}.alpha"]) == 3.0
    assert kohya[f"{ff}.lora_down.weight"].shape[0] == 4 and float(kohya[f"{ff}.alpha"]) == 4.0
    for name in (conv, ff, "lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_unet_up_blocks_0_upsamplers_0_conv"):
        assert f"{name}.dora_scale" in kohya, name
    assert kohya[f"{conv}.lora_up.weight"].abs().max() > 0, "the conv pair's B (zero at the start) never moved"
    base_norms = _unet(tiny_sd).down_blocks[0].resnets[0].conv1.weight.detach().flatten(1).norm(dim=1)
    assert not torch.allclose(kohya[f"{conv}.dora_scale"].flatten(), base_norms), "the magnitudes never moved"

    diffusers_file = out / "pytorch_lora_weights.safetensors"
    keys = set(load_file(str(diffusers_file)))
    for key in ("unet.down_blocks.0.resnets.0.conv1.lora.down.weight", "unet.down_blocks.0.resnets.0.conv1."
                "lora_magnitude_vector", "unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.lora.up."
                "weight", "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_magnitude_vector.weight"):
        assert key in keys, key
    header = _header(diffusers_file)
    adapter = json.loads(header["lora_adapter_metadata"])  # diffusers' "<model>.<LoraConfig field>" keys
    assert adapter["unet.use_dora"] and adapter["text_encoder.use_dora"]
    assert adapter["unet.rank_pattern"]["down_blocks.0.resnets.0.conv1"] == 2
    assert adapter["unet.alpha_pattern"]["down_blocks.0.resnets.0.conv1"] == 3.0
    for path in (out / "out.safetensors", diffusers_file):
        meta = _header(path)
        assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_network_dim"] == "4"
        assert json.loads(meta["ss_network_args"]) == {"algo": "locon", "dora_wd": "True", "conv_dim": "2",
                                                       "conv_alpha": "3.0"}
        assert json.loads(meta["adaprelora_config"])["lora_layers"] == "attn-ff"


@pytest.mark.slow
def test_all_linear_locon_dora_run_on_tiny_sdxl(launch, tiny_sdxl, instance_dir, dreambooth_args, tmp_path):
    """SDXL: all-linear + LoCon + DoRA on the UNet and both text encoders; kohya's SGM names, and the
    run's export check reloads both files."""
    out = tmp_path / "out"
    proc = launch(dreambooth_args(tiny_sdxl, instance_dir, out, 1) + [
        "--lora_layers", "all-linear", "--conv_rank", "2", "--use_dora", "--train_text_encoder",
        "--report_to", "none", "--num_validation_images", "0"], threads=2)
    assert "verified: diffusers file ok, kohya file ok" in proc.stdout.strip().splitlines()[-1], proc.stdout
    kohya = load_file(str(out / "out.safetensors"))
    for name in ("input_blocks_1_0_in_layers_2", "input_blocks_3_0_op", "output_blocks_2_2_conv", "time_embed_0",
                 "label_emb_0_0", "input_blocks_4_1_transformer_blocks_0_ff_net_2"):
        assert f"lora_unet_{name}.dora_scale" in kohya, name
    assert float(kohya["lora_unet_input_blocks_3_0_op.alpha"]) == 1.0  # kohya's conv_alpha default
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in kohya
    meta = _header(out / "out.safetensors")
    assert json.loads(meta["ss_network_args"]) == {"algo": "locon", "dora_wd": "True", "conv_dim": "2",
                                                   "conv_alpha": "1.0"}
