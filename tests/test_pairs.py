"""Pair discovery on real PEFT, diffusers and transformers models."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from adaprelora import AdaPreLoRA, find_lora_pairs
from adaprelora.pairs import pairs_from_tuples
from adaprelora.testing.lora_models import SimpleNet, make_lora_model


def test_peft_linear_and_conv_pairs_are_found_sorted_with_their_scale():
    model = make_lora_model(r=4, alpha=12)
    pairs = find_lora_pairs(model)
    assert [p.name.split(".")[-2] for p in pairs] == ["conv", "lin0", "lin1"]
    assert [p.name for p in pairs] == sorted(p.name for p in pairs)
    conv = pairs[0]
    assert conv.is_conv and conv.A.shape == (4, 3, 3, 3) and conv.B.shape == (5, 4, 1, 1)
    assert (conv.m, conv.n, conv.r) == (5, 27, 4)
    assert all(p.scaling() == 3.0 for p in pairs)


def test_only_the_active_adapter_is_paired():
    model = make_lora_model()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["lin0"]))
    names = {p.name for p in find_lora_pairs(model)}
    assert all(n.endswith(".default") for n in names)
    model.set_adapter("other")
    assert {p.name.split(".")[-1] for p in find_lora_pairs(model)} == {"other"}


def test_frozen_adapter_is_skipped():
    model = make_lora_model()
    for n, p in model.named_parameters():
        if "lin1" in n:
            p.requires_grad_(False)
    assert "lin1" not in " ".join(p.name for p in find_lora_pairs(model))


def test_diffusers_unet_with_peft_backend():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                norm_num_groups=32, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pairs = find_lora_pairs(unet)
    n_attn = sum(1 for n, _ in unet.named_modules() if n.endswith("attn1") or n.endswith("attn2"))
    assert len(pairs) == 4 * n_attn > 0
    assert {p.name.split(".")[-2] for p in pairs} >= {"to_q", "to_k", "to_v", "0"}
    opt = AdaPreLoRA(unet, lr=1e-3)
    out = unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 3, 32)).sample
    out.pow(2).mean().backward()
    opt.step()
    assert all(r is None for r in opt._collector.rows), "energies are consumed by the step"


def test_transformers_text_encoder_and_llm():
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaForCausalLM

    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=100))
    te.add_adapter(LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    assert len(find_lora_pairs(te)) == 8
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    llm = get_peft_model(llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    pairs = find_lora_pairs(llm)
    assert len(pairs) == 6
    down = [p for p in pairs if "down_proj" in p.name][0]
    assert (down.m, down.n) == (32, 48)


def test_tuple_pairs_check_shapes():
    A, B = torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(4, 2))
    with pytest.raises(ValueError, match="rank mismatch"):
        pairs_from_tuples([(A, B, 1.0)])
    with pytest.raises(ValueError, match=r"\(A, B, scale\)"):
        pairs_from_tuples([(A, B)])


def test_model_without_lora_has_no_pairs():
    assert find_lora_pairs(SimpleNet()) == []
