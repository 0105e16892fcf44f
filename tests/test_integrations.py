"""The recipes of docs/integrations.md, each on real code where it installs from the index: TRL's
SFTTrainer (tangent energies from `optimizer_cls_and_kwargs`, exact ones with `attach`), a PEFT
QLoRA model on a bitsandbytes 4-bit base, diffusers' scripts' `params_to_optimize`, and kohya's
layout (rebuilt in `adaprelora.testing.kohya_network`, driven the way kohya's `get_optimizer`
builds a `module.Class` optimizer). Each trains (the loss falls), finds every pair, and gives the
update of the model-built optimizer on the same pairs and energies."""
from __future__ import annotations

import ast
import importlib

import pytest
import torch
from torch import nn

from adaprelora import AdaPreLoRA, find_lora_pairs
from adaprelora.testing.kohya_network import kohya_loss, tiny_kohya_setup
from adaprelora.testing.tiny_lm import build_byte_tokenizer, save_tiny_lm, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["the cat sat on the mat, the cat sat on the mat", "a dog ran in the park, a dog ran in the park"] * 8


def _peft_llama(seed: int = 0, base=None):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed=0) if base is None else base
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # B = 0 at PEFT's init: give it a value so A's gradient is not zero either
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def _lm_batch(tokenizer, device="cpu"):
    enc = tokenizer(TEXTS[:4], return_tensors="pt", padding=True)
    return {"input_ids": enc.input_ids.to(device), "attention_mask": enc.attention_mask.to(device),
            "labels": enc.input_ids.to(device)}


def _assert_same_updates(model_a, model_b, opt_a, opt_b, loss_fn, steps: int = 2):
    """Step both optimizers on the same losses; every trainable tensor ends within 1e-6."""
    for step in range(steps):
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            loss_fn(model, step).backward()
            opt.step()
            opt.zero_grad()
    a = {n: p for n, p in model_a.named_parameters() if p.requires_grad}
    b = {n: p for n, p in model_b.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


# -- TRL ------------------------------------------------------------------------------------------
def _sft_trainer(model, tmp_path, **kw):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                     max_steps=10, learning_rate=2e-2, logging_steps=1, save_strategy="no", disable_tqdm=True,
                     max_length=32, seed=0, data_seed=0, dataloader_num_workers=0)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                      processing_class=build_byte_tokenizer(), **kw)


def _losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


@pytest.mark.timeout(300)
def test_trl_sft_trainer_builds_it_from_its_param_groups(tmp_path):
    pytest.importorskip("trl")
    model = _peft_llama()
    trainer = _sft_trainer(model, tmp_path, optimizer_cls_and_kwargs=(AdaPreLoRA, {"lr": 2e-2}))
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, AdaPreLoRA) and opt.stats == "tangent"
    assert len(opt.pairs) == 4 and {(id(p.A), id(p.B)) for p in opt.pairs} == {
        (id(p.A), id(p.B)) for p in find_lora_pairs(model)}
    losses = _losses(trainer)
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3]) - 0.1, losses


@pytest.mark.timeout(300)
def test_trl_sft_trainer_with_an_attached_list_built_optimizer_reads_exact_energies(tmp_path):
    pytest.importorskip("trl")
    model = _peft_llama()
    opt = AdaPreLoRA(model.parameters(), lr=2e-2).attach(model)
    take, seen = opt._collector.take, []
    opt._collector.take = lambda ids: seen.append(take(ids)) or seen[-1]
    trainer = _sft_trainer(model, tmp_path, optimizers=(opt, None))
    trainer.train()
    assert len(opt.pairs) == 4 and opt.stats == "exact"
    assert seen and all(r is not None for rows, _ in seen for r in rows), "every step had every layer's energies"
    losses = _losses(trainer)
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.1, losses

    # the same pairs and energies as AdaPreLoRA(model): the same update
    tok = build_byte_tokenizer()
    batch = _lm_batch(tok)
    model_a, model_b = _peft_llama(seed=3), _peft_llama(seed=3)
    _assert_same_updates(model_a, model_b, AdaPreLoRA(model_a.parameters(), lr=1e-2).attach(model_a),
                         AdaPreLoRA(model_b, lr=1e-2), lambda m, step: m(**batch).loss)


# -- QLoRA: PEFT on a bitsandbytes 4-bit base ------------------------------------------------------
def _qlora_model(folder, seed: int):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant,
                                                device_map="cuda" if torch.cuda.is_available() else "cpu")
    return _peft_llama(seed=seed, base=base)


@pytest.fixture(scope="module")
def qlora_folder(tmp_path_factory):
    """A tiny Llama saved to disk, and a check that bitsandbytes runs its 4-bit layers here."""
    bnb = pytest.importorskip("bitsandbytes")
    folder = save_tiny_lm("llama", str(tmp_path_factory.mktemp("tiny-llama")))
    try:
        layer = bnb.nn.Linear4bit(32, 32, compute_dtype=torch.float32, quant_type="nf4")
        layer = layer.to("cuda" if torch.cuda.is_available() else "cpu")
        layer(torch.randn(2, 32, device=layer.weight.device))
    except Exception as err:  # a bitsandbytes build without kernels for this device
        pytest.skip(f"bitsandbytes cannot run 4-bit layers on this machine: {err}")
    return folder


@pytest.mark.timeout(300)
def test_qlora_4bit_base_list_built_with_exact_energies(qlora_folder):
    import bitsandbytes as bnb

    model = _qlora_model(qlora_folder, seed=0)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()), "the base really is 4-bit"
    opt = AdaPreLoRA(model.parameters(), lr=2e-2).attach(model)
    assert len(opt.pairs) == 4 and opt.stats == "exact"
    batch = _lm_batch(build_byte_tokenizer(), device=next(model.parameters()).device)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        assert all(r is not None for r in opt._collector.rows), "the 4-bit layers' LoRA were hooked"
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses

    model_a, model_b = _qlora_model(qlora_folder, seed=5), _qlora_model(qlora_folder, seed=5)
    _assert_same_updates(model_a, model_b, AdaPreLoRA(model_a.parameters(), lr=1e-2).attach(model_a),
                         AdaPreLoRA(model_b, lr=1e-2), lambda m, step: m(**batch).loss)


# -- kohya sd-scripts / musubi-tuner ---------------------------------------------------------------
def kohya_get_optimizer(optimizer_type: str, optimizer_args: list[str], lr: float, trainable_params):
    """What kohya's `get_optimizer` does for `--optimizer_type module.Class --optimizer_args k=v ...`."""
    kwargs = {}
    for arg in optimizer_args:
        key, value = arg.split("=")
        kwargs[key] = ast.literal_eval(value)
    module, name = optimizer_type.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(trainable_params, lr=lr, **kwargs)


class _Pipeline(nn.Module):
    """The text encoder, UNet and LoRA network of one kohya setup, as one model for the loss."""

    def __init__(self, te, unet, network):
        super().__init__()
        self.te, self.unet, self.network = te, unet, network


def _kohya_train(loraplus_ratio):
    te, unet, network = tiny_kohya_setup(seed=1, loraplus_lr_ratio=loraplus_ratio)
    params, descriptions = network.prepare_optimizer_params(text_encoder_lr=5e-3, unet_lr=1e-2, default_lr=1e-2)
    opt = kohya_get_optimizer("adaprelora.AdaPreLoRA", ["variant='adamw'", "weight_decay=0.0"], 1e-2, params)
    loras = network.text_encoder_loras + network.unet_loras
    assert len(opt.pairs) == len(loras) == 5
    assert [(id(p.A), id(p.B)) for p in opt.pairs] == [(id(m.lora_down.weight), id(m.lora_up.weight)) for m in loras]
    with torch.no_grad():
        eval_before = float(sum(kohya_loss(te, unet, 100 + i) for i in range(4)))
    for step in range(30):
        kohya_loss(te, unet, step % 6).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        eval_after = float(sum(kohya_loss(te, unet, 100 + i) for i in range(4)))
    assert eval_after < 0.9 * eval_before, (eval_before, eval_after)
    return descriptions


def _kohya_same_update(loraplus_ratio):
    """Order-found pairs (scale 1) against the pairs given with kohya's scale alpha / r, both with
    exact energies from the network's modules: the adamw step does not depend on the scale."""
    setups = [tiny_kohya_setup(seed=2, loraplus_lr_ratio=loraplus_ratio) for _ in range(2)]
    opts = []
    for i, (_, _, network) in enumerate(setups):
        params, _ = network.prepare_optimizer_params(5e-3, 1e-2, 1e-2)
        loras = network.text_encoder_loras + network.unet_loras
        given = [(m.lora_down.weight, m.lora_up.weight, m.scale * m.multiplier) for m in loras] if i else None
        opts.append(AdaPreLoRA(params, lr=1e-2, pairs=given).attach(network))
    assert [p.scaling() for p in opts[1].pairs] == [0.5] * 5 and [p.scaling() for p in opts[0].pairs] == [1.0] * 5
    models = [_Pipeline(*s) for s in setups]
    _assert_same_updates(models[0], models[1], opts[0], opts[1], lambda m, step: kohya_loss(m.te, m.unet, step), 3)


@pytest.mark.timeout(120)
def test_kohya_network_with_per_part_learning_rates():
    assert _kohya_train(None) == ["textencoder", "unet"]
    _kohya_same_update(None)


@pytest.mark.timeout(120)
def test_kohya_network_with_loraplus_groups():
    assert _kohya_train(16.0) == ["textencoder", "textencoder plus", "unet", "unet plus"]
    _kohya_same_update(16.0)


# -- diffusers' example scripts ------------------------------------------------------------------
def _sd_parts(seed: int = 0):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                norm_num_groups=32, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=100))
    unet.requires_grad_(False)
    te.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    te.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                              target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    with torch.no_grad():
        for name, p in list(unet.named_parameters()) + list(te.named_parameters()):
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return unet, te


def _sd_loss(unet, te, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step % 4)
    ids = torch.randint(0, 100, (2, 6), generator=g)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    target = latents.flip(-1)  # something for the LoRA to learn
    out = unet(latents, 10, encoder_hidden_states=te(ids).last_hidden_state).sample
    return ((out - target) ** 2).mean()


def _params_to_optimize(unet, te, lr, text_encoder_lr, weight_decay_te):
    """train_dreambooth_lora_sdxl.py's list (one text encoder here)."""
    unet_lora_parameters = list(filter(lambda p: p.requires_grad, unet.parameters()))
    text_lora_parameters = list(filter(lambda p: p.requires_grad, te.parameters()))
    return [{"params": unet_lora_parameters, "lr": lr},
            {"params": text_lora_parameters, "weight_decay": weight_decay_te, "lr": text_encoder_lr}]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_diffusers_scripts_params_to_optimize_with_a_text_encoder_lr():
    unet, te = _sd_parts()
    optimizer_class = AdaPreLoRA  # the script's `optimizer_class = torch.optim.AdamW`
    optimizer = optimizer_class(_params_to_optimize(unet, te, 2e-2, 1e-2, 1e-3), lr=2e-2, betas=(0.9, 0.999),
                                weight_decay=1e-4, eps=1e-8)
    optimizer.attach(unet, te)
    assert len(optimizer.pairs) == len(find_lora_pairs(unet)) + len(find_lora_pairs(te)) == 40
    assert [g["lr"] for g in optimizer.param_groups] == [2e-2, 1e-2]
    with torch.no_grad():
        eval_before = float(sum(_sd_loss(unet, te, i) for i in range(4)))
    for step in range(24):
        _sd_loss(unet, te, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        eval_after = float(sum(_sd_loss(unet, te, i) for i in range(4)))
    assert eval_after < 0.9 * eval_before, (eval_before, eval_after)

    # with one lr for both parts it is AdaPreLoRA on the two models
    parts_a, parts_b = _sd_parts(seed=1), _sd_parts(seed=1)
    model_a, model_b = nn.ModuleDict(dict(zip(("unet", "te"), parts_a))), nn.ModuleDict(dict(zip(("unet", "te"), parts_b)))
    listed = AdaPreLoRA(_params_to_optimize(*parts_a, 1e-2, 1e-2, 0.0), lr=1e-2).attach(*parts_a)
    built = AdaPreLoRA(model_b, lr=1e-2)
    _assert_same_updates(model_a, model_b, listed, built, lambda m, step: _sd_loss(m["unet"], m["te"], step))

