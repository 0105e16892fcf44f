"""AdaPreLoRA built from a bare parameter list (how kohya, diffusers' scripts and the Trainer build
optimizers): pairs found by order and by name on real PEFT models and a kohya-style network, the
bad inputs, what the LoRA scale changes (against the float64 reference), `attach(model)` for exact
energies, and saving / resuming in a fresh process."""
from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_optimizer import _ref_step  # the independent float64 reference of the update rule
from torch import nn

from adaprelora import AdaPreLoRA, find_lora_pairs
from adaprelora.testing.kohya_network import kohya_loss, tiny_kohya_setup
from adaprelora.testing.lora_models import SimpleNet, forward_backward, make_lora_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids(pairs):
    return {(id(p.A), id(p.B)) for p in pairs}


# -- finding the pairs ---------------------------------------------------------------------------
def test_peft_parameters_and_named_parameters_give_the_models_pairs():
    model = make_lora_model(r=4, alpha=12, modules_to_save=["norm"])
    expected = find_lora_pairs(model)
    by_order = AdaPreLoRA(model.parameters(), lr=1e-3)  # a generator, as the trainers pass it
    by_name = AdaPreLoRA(model.named_parameters(), lr=1e-3)
    assert len(by_order.pairs) == len(by_name.pairs) == len(expected) == 3
    assert _ids(by_order.pairs) == _ids(by_name.pairs) == _ids(expected)
    assert {p.name for p in by_name.pairs} == {p.name for p in expected}
    assert [p.A for p in by_order.pairs] == [p for n, p in model.named_parameters() if "lora_A" in n]
    assert by_order.stats == "tangent" and all(p.scaling() == 1.0 for p in by_order.pairs)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in by_order.param_groups) == len(list(model.parameters()))
    assert n_trainable == 8  # 3 pairs + the saved LayerNorm's weight and bias


def test_named_items_pair_by_name_whatever_their_order():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(SimpleNet(), LoraConfig(r=2, target_modules=["lin0", "lin1"], lora_bias=True))
    assert any("lora_B.default.bias" in n for n, _ in model.named_parameters())  # a bias beside the factors
    for params in (model.named_parameters(), model.parameters()):
        assert _ids(AdaPreLoRA(params, lr=1e-3).pairs) == _ids(find_lora_pairs(model))
    model = make_lora_model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    random.Random(0).shuffle(named)
    opt = AdaPreLoRA(named, lr=1e-3)
    assert _ids(opt.pairs) == _ids(find_lora_pairs(model))
    with pytest.raises(ValueError, match="no partner"):  # the same shuffle read by order is refused
        AdaPreLoRA([p for _, p in named], lr=1e-3, pairs_from="order")


def test_kohya_groups_per_part_lr_pair_within_groups():
    te, unet, network = tiny_kohya_setup()
    params, descriptions = network.prepare_optimizer_params(text_encoder_lr=5e-4, unet_lr=1e-3, default_lr=1e-3)
    assert descriptions == ["textencoder", "unet"]
    opt = AdaPreLoRA(params, lr=1e-3)
    loras = network.text_encoder_loras + network.unet_loras
    assert len(opt.pairs) == len(loras) == 5
    assert [(id(p.A), id(p.B)) for p in opt.pairs] == [(id(m.lora_down.weight), id(m.lora_up.weight)) for m in loras]
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 1e-3]
    conv = [p for p in opt.pairs if p.is_conv]
    assert len(conv) == 2 and conv[0].A.shape == (4, 4, 3, 3) and conv[1].B.shape == (4, 4, 1, 1)
    # kohya's named parameters are read by name the same way
    assert _ids(AdaPreLoRA(network.named_parameters(), lr=1e-3).pairs) == _ids(opt.pairs)


def test_split_layers_and_several_adapters_pair_by_position():
    """k down factors followed by k up factors: a layer whose LoRA is split into q/k/v parts (a
    ModuleList of lora_down, then one of lora_up), or a PEFT layer with two trainable adapters."""
    downs = [nn.Parameter(torch.randn(4, 12)) for _ in range(3)]
    ups = [nn.Parameter(torch.randn(m, 4)) for m in (8, 6, 6)]
    other = [nn.Parameter(torch.randn(2, 12)), nn.Parameter(torch.randn(5, 2))]
    opt = AdaPreLoRA(other + downs + ups, lr=1e-3)
    assert [(p.A, p.B) for p in opt.pairs] == [(other[0], other[1])] + list(zip(downs, ups))
    from peft import LoraConfig

    model = make_lora_model()
    model.add_adapter("other", LoraConfig(r=4, target_modules=["lin0", "lin1"]))
    model.base_model.set_adapter(["default", "other"])  # both adapters active and trainable
    expected = find_lora_pairs(model)
    assert len(expected) == 5
    assert _ids(AdaPreLoRA(model.parameters(), lr=1e-3).pairs) == _ids(expected)


def test_kohya_loraplus_groups_pair_across_groups_by_position():
    from adaprelora.param_list_pairs import pairs_from_param_list

    te, unet, network = tiny_kohya_setup(loraplus_lr_ratio=16)
    params, descriptions = network.prepare_optimizer_params(5e-4, 1e-3, 1e-3)
    assert descriptions == ["textencoder", "textencoder plus", "unet", "unet plus"]
    _, pairs = pairs_from_param_list(params)
    loras = network.text_encoder_loras + network.unet_loras
    assert [(id(p.A), id(p.B)) for p in pairs] == [(id(m.lora_down.weight), id(m.lora_up.weight)) for m in loras]


def test_kohya_block_lr_with_loraplus_pairs_each_block_and_leaves_out_zero_lr_blocks():
    """kohya's block lr weights: a group (and a LoRA+ group) per UNet block at unet_lr * weight; a
    block of weight 0 is not in the list at all."""
    te, unet, network = tiny_kohya_setup(loraplus_lr_ratio=4.0)
    network.set_block_lr_weight([1.0, 0.0, 0.5])
    params, descriptions = network.prepare_optimizer_params(5e-4, 1e-3, 1e-3)
    assert descriptions == ["textencoder", "textencoder plus", "unet_block0", "unet_block0 plus",
                            "unet_block2", "unet_block2 plus"]
    opt = AdaPreLoRA(params, lr=1e-3)
    listed = network.text_encoder_loras + [network.unet_loras[0], network.unet_loras[2]]
    assert [(id(p.A), id(p.B)) for p in opt.pairs] == [(id(m.lora_down.weight), id(m.lora_up.weight)) for m in listed]
    group_of = {id(t): gi for gi, g in enumerate(opt.param_groups) for t in g["params"]}
    assert [(group_of[id(p.A)], group_of[id(p.B)]) for p in opt.pairs] == [(0, 1), (0, 1), (2, 3), (4, 5)]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 2e-3, 1e-3, 4e-3, 5e-4, 2e-3])


def test_musubi_layout_one_group_and_its_loraplus_group():
    """musubi-tuner's network has no text-encoder part: one group for the DiT and, with LoRA+, one
    of its lora_up weights (here kohya's network with the text encoder's lr 0, which leaves it out)."""
    te, unet, network = tiny_kohya_setup(loraplus_lr_ratio=4.0)
    params, descriptions = network.prepare_optimizer_params(0, 1e-3, 1e-3)
    assert descriptions == ["unet", "unet plus"]
    opt = AdaPreLoRA(params, lr=1e-3)
    assert [(id(p.A), id(p.B)) for p in opt.pairs] == [
        (id(m.lora_down.weight), id(m.lora_up.weight)) for m in network.unet_loras]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 4e-3])


def test_a_trainable_head_shaped_like_a_factor_gets_adamw_when_its_bias_follows_it():
    """A classifier head of r labels (r, hidden) saved with modules_to_save has a LoRA down factor's
    shape; followed by its bias it is an ordinary layer (AdamW), while the same weight without a
    bias after it is refused as an unpaired factor."""
    from peft import LoraConfig, get_peft_model

    class Classifier(nn.Module):
        def __init__(self, bias: bool):
            super().__init__()
            self.body, self.head = nn.Linear(16, 16), nn.Linear(16, 2, bias=bias)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    torch.manual_seed(0)
    model = get_peft_model(Classifier(bias=True), LoraConfig(r=2, target_modules=["body"], modules_to_save=["head"]))
    opt = AdaPreLoRA(model.parameters(), lr=1e-2)
    assert _ids(opt.pairs) == _ids(find_lora_pairs(model)) and len(opt.pairs) == 1
    head = model.base_model.model.head.modules_to_save["default"]
    before = head.weight.detach().clone()
    model(torch.randn(4, 16)).square().mean().backward()
    opt.step()
    assert not torch.equal(head.weight, before)  # stepped, by the AdamW for tensors outside pairs
    bare = get_peft_model(Classifier(bias=False), LoraConfig(r=2, target_modules=["body"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match=r"tensor 5 \(param group 0, position 5, shape \(2, 16\)\) has the shape of a "
                                         r"rank-2 LoRA factor but no partner"):
        AdaPreLoRA(bare.parameters(), lr=1e-2)
    assert len(AdaPreLoRA(bare.named_parameters(), lr=1e-2).pairs) == 1  # what the error says to pass


def test_a_bias_free_bottleneck_reads_as_a_pair_by_order_but_not_by_name():
    """By order alone, a trainable (r, in) weight directly followed by a trainable (out, r) one is a
    LoRA pair, whatever the layers are (here a bias-free bottleneck head); names tell them apart."""
    model = make_lora_model()
    head = nn.Sequential(nn.Linear(16, 4, bias=False), nn.ReLU(), nn.Linear(4, 16, bias=False))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + list(head.named_parameters())
    by_order = AdaPreLoRA([p for _, p in named], lr=1e-3)
    assert len(by_order.pairs) == 4 and (by_order.pairs[-1].A, by_order.pairs[-1].B) == (head[0].weight, head[2].weight)
    by_name = AdaPreLoRA(named, lr=1e-3)
    assert _ids(by_name.pairs) == _ids(find_lora_pairs(model)) and len(by_name.pairs) == 3


_ONLY_TORCH = textwrap.dedent("""
    import sys
    for name in ("peft", "transformers", "diffusers", "accelerate", "bitsandbytes", "triton"):
        sys.modules[name] = None  # an import of any of them now fails
    import torch
    from adaprelora import AdaPreLoRA
    from adaprelora.testing.kohya_network import kohya_loss, tiny_kohya_setup
    torch.set_num_threads(1)
    te, unet, network = tiny_kohya_setup(loraplus_lr_ratio=4.0)
    params, _ = network.prepare_optimizer_params(5e-4, 1e-3, 1e-3)
    opt = AdaPreLoRA(params, lr=1e-3).attach(network)
    before = [p.detach().clone() for p in network.parameters()]
    kohya_loss(te, unet, 0).backward()
    opt.step()
    moved = sum(not torch.equal(a, p) for a, p in zip(before, network.parameters()))
    print(len(opt.pairs), opt.stats, moved)
""")


def test_a_kohya_environment_needs_only_torch(tmp_path):
    """kohya's and musubi's environments need not have peft, transformers or diffusers: the
    list-built optimizer (and attach to kohya's modules) imports none of them."""
    script = tmp_path / "only_torch.py"
    script.write_text(_ONLY_TORCH)
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, str(script)], check=True, timeout=120, cwd=root, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": root})
    assert out.stdout.split() == ["5", "exact", "10"], out.stdout + out.stderr


def test_tensors_outside_pairs_get_plain_adamw():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(SimpleNet(), LoraConfig(r=2, target_modules=["lin0", "lin1"], use_dora=True,
                                                   modules_to_save=["norm"]))
    model.base_model.model.emb.weight.requires_grad_(True)  # a trainable embedding, too
    opt = AdaPreLoRA(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.01)
    assert len(opt.pairs) == 2
    paired = {id(t) for p in opt.pairs for t in (p.A, p.B)}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in paired]
    assert len(others) == 5  # two DoRA magnitudes, the saved norm's weight and bias, the embedding
    copies = [nn.Parameter(p.detach().clone()) for p in others]
    ref = torch.optim.AdamW(copies, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.01)
    for step in range(3):
        forward_backward(model, step, with_img=False)
        for c, p in zip(copies, others):
            c.grad = p.grad.clone()
        opt.step()
        ref.step()
        opt.zero_grad()
    for c, p in zip(copies, others):
        torch.testing.assert_close(p.detach(), c.detach(), rtol=1e-6, atol=1e-7)


# -- bad input -----------------------------------------------------------------------------------
def _lora_list(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_a_factor_without_its_partner_is_one_error_naming_it_and_what_to_pass():
    params = _lora_list(make_lora_model())  # lin0 A, B, lin1 A, B, conv A, B
    del params[3]
    with pytest.raises(ValueError) as err:
        AdaPreLoRA(params, lr=1e-3)
    msg = str(err.value)
    assert "tensor 2 (param group 0, position 2, shape (4, 16))" in msg
    assert "pairs_from='names'" in msg and "pairs=[(A, B, scale), ...]" in msg and "pairs_from='none'" in msg
    named = [(n, p) for n, p in make_lora_model().named_parameters() if "lin1.lora_B" not in n]
    with pytest.raises(ValueError, match=r"lin1\.lora_A\.default\.weight.*partner is not in the parameter list"):
        AdaPreLoRA(named, lr=1e-3)


def test_an_order_we_do_not_know_is_one_error():
    params = _lora_list(make_lora_model())
    swapped = [params[i ^ 1] for i in range(len(params))]  # lora_B before lora_A in every module
    with pytest.raises(ValueError, match=r"tensor 0 \(param group 0, position 0, shape \(16, 4\)\).*before a down/A"):
        AdaPreLoRA(swapped, lr=1e-3)
    # LyCORIS LoHa order (w1_a (out, r), w1_b (r, in), w2_a, w2_b) is not LoRA and is refused
    loha = [nn.Parameter(torch.randn(*s)) for s in [(16, 4), (4, 12), (16, 4), (4, 12)]]
    with pytest.raises(ValueError, match="LoHa"):
        AdaPreLoRA(loha, lr=1e-3)
    # three down factors then two up factors of that rank: not a layout we know
    split = [nn.Parameter(torch.randn(*s)) for s in [(4, 12)] * 3 + [(8, 4)] * 2]
    with pytest.raises(ValueError, match=r"tensor 0 \(param group 0, position 0, shape \(4, 12\)\).*no partner"):
        AdaPreLoRA(split, lr=1e-3)
    # a reversed LoRA+ layout (up factors' group first) leaves every factor without partner
    te, unet, network = tiny_kohya_setup(loraplus_lr_ratio=4)
    params, _ = network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    with pytest.raises(ValueError, match="found no trainable LoRA pair"):
        AdaPreLoRA([params[1], params[0]], lr=1e-3)


def test_duplicates_empty_groups_frozen_tensors_and_misuse():
    model = make_lora_model()
    params = _lora_list(model)
    with pytest.raises(ValueError, match=r"tensor 6 .* is the same tensor as tensor 0 .*pass each parameter once"):
        AdaPreLoRA([{"params": params}, {"params": params[:1]}], lr=1e-3)
    # an empty group is fine, also between LoRA+'s group of down factors and its group of up factors
    opt = AdaPreLoRA([{"params": []}, {"params": params}], lr=1e-3)
    assert len(opt.pairs) == 3
    _, _, network = tiny_kohya_setup(loraplus_lr_ratio=4.0)
    groups, _ = network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    plus = AdaPreLoRA([groups[0], {"params": [], "lr": 1e-3}, groups[1]] + groups[2:], lr=1e-3)
    loras = network.text_encoder_loras + network.unet_loras
    assert [(p.A, p.B) for p in plus.pairs] == [(m.lora_down.weight, m.lora_up.weight) for m in loras]
    forward_backward(model, 0)
    opt.step()
    # a frozen tensor in the list is never paired and never moves; a frozen B leaves its A unpaired
    frozen = nn.Parameter(torch.randn(4, 16), requires_grad=False)
    before = frozen.detach().clone()
    opt = AdaPreLoRA(params[:2] + [frozen] + params[2:], lr=1e-3)
    assert len(opt.pairs) == 3
    forward_backward(model, 1)
    opt.step()
    assert torch.equal(frozen, before)
    params[1].requires_grad_(False)
    with pytest.raises(ValueError, match=r"tensor 0 .*shape \(4, 12\)"):
        AdaPreLoRA(params, lr=1e-3)
    params[1].requires_grad_(True)
    with pytest.raises(ValueError, match="found no trainable LoRA pair in the parameter list, read by order: "):
        AdaPreLoRA(SimpleNet().parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"no trainable LoRA pair .*, read by names: .*pairs=\[\(A, B, scale\)"):
        AdaPreLoRA(SimpleNet().named_parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="did not find any trainable LoRA"):
        AdaPreLoRA(params, lr=1e-3, pairs_from="none")
    with pytest.raises(ValueError, match="needs \\(name, tensor\\) items"):
        AdaPreLoRA(params, lr=1e-3, pairs_from="names")
    with pytest.raises(ValueError, match="pairs_from must be one of"):
        AdaPreLoRA(params, lr=1e-3, pairs_from="shape")
    with pytest.raises(ValueError, match="leave pairs_from and lora_scale out"):
        AdaPreLoRA(params, lr=1e-3, pairs=[(params[0], params[1], 1.0)], pairs_from="order")
    with pytest.raises(ValueError, match=r"call optimizer\.attach\(model\)"):
        AdaPreLoRA(params, lr=1e-3, stats="exact")
    with pytest.raises(ValueError, match="apply to parameter lists"):
        AdaPreLoRA(model, lr=1e-3, pairs_from="names")
    with pytest.raises(ValueError, match="lora_scale has 2 values but 3 LoRA pairs"):
        AdaPreLoRA(params, lr=1e-3, lora_scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="some items of the parameter list are"):
        AdaPreLoRA([("a", params[0]), params[1]], lr=1e-3)


def test_a_pair_over_two_groups_that_differ_in_more_than_lr_is_one_error():
    """LoRA+ gives B its own lr; any other setting of a pair's step comes from one group, so groups
    that split a pair and differ in, say, weight_decay are refused rather than half-applied."""
    A, B = nn.Parameter(torch.randn(4, 12)), nn.Parameter(torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"LoRA pair 'param_groups\[0\]\[0\]\+param_groups\[1\]\[0\]': A is in "
                                         r"param group 0 and B in param group 1, whose weight_decay differ \(0\.0 vs "
                                         r"0\.1\).*same settings except lr"):
        AdaPreLoRA([{"params": [A]}, {"params": [B], "lr": 4e-3, "weight_decay": 0.1}], lr=1e-3)
    with pytest.raises(ValueError, match="whose betas differ"):
        AdaPreLoRA([{"params": [A]}, {"params": [B], "betas": (0.9, 0.99)}], lr=1e-3)
    opt = AdaPreLoRA([{"params": [A], "betas": [0.9, 0.99]}, {"params": [B], "lr": 4e-3, "betas": (0.9, 0.99)}], lr=1e-3)
    assert len(opt.pairs) == 1  # only the lr differs (betas as a list or a tuple are the same)


def test_loraplus_pairs_step_each_factor_with_its_groups_lr():
    """kohya's LoRA+ puts lora_up in its own group at lr * ratio: A steps with its group's lr and B
    with its own (float64 reference, step by step)."""
    rng = np.random.default_rng(5)
    m, n, r, lr_a, ratio = 8, 6, 2, 0.02, 4.0
    A0, B0 = rng.standard_normal((r, n)), rng.standard_normal((m, r))
    A, B = nn.Parameter(torch.tensor(A0)), nn.Parameter(torch.tensor(B0))
    opt = AdaPreLoRA([{"params": [A], "lr": lr_a}, {"params": [B], "lr": lr_a * ratio}], lr=lr_a)
    assert len(opt.pairs) == 1
    state, Ar, Br = {}, A0, B0
    for step in range(4):
        G = rng.standard_normal((m, n)) * np.exp(rng.standard_normal(n))
        A.grad = torch.tensor(B.detach().numpy().T @ G)
        B.grad = torch.tensor(G @ A.detach().numpy().T)
        opt.step()
        twin = copy.deepcopy(state)  # the moments do not depend on lr: one copy per factor's lr
        Ar_next, _ = _ref_step(state, Ar, Br, G, 1.0, lr=lr_a, variant="adamw")
        _, Br = _ref_step(twin, Ar, Br, G, 1.0, lr=lr_a * ratio, variant="adamw")
        Ar = Ar_next
        np.testing.assert_allclose(A.detach().numpy(), Ar, rtol=1e-8, atol=1e-10, err_msg=f"A at step {step}")
        np.testing.assert_allclose(B.detach().numpy(), Br, rtol=1e-8, atol=1e-10, err_msg=f"B at step {step}")


# -- the LoRA scale ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_what_the_lora_scale_changes_in_the_step(variant):
    """A list holds no alpha, so s = 1 unless `lora_scale` gives it. With the true s the steps are
    the float64 reference's for s; with s = 1 they are the reference's for s = 1 on the gradient
    the list really has (s_true * G). The adamw variant's step does not depend on s at all; the sgd
    variant's does: its weight step is lr * s_true / lora_scale times the solved direction."""
    rng = np.random.default_rng(1)
    m, n, r, s = 9, 7, 3, 2.5
    A0, B0 = rng.standard_normal((r, n)), rng.standard_normal((m, r))
    lr = 0.05 if variant == "adamw" else 0.01
    runs = {}
    for given in (s, None):
        A, B = nn.Parameter(torch.tensor(A0)), nn.Parameter(torch.tensor(B0))
        opt = AdaPreLoRA([A, B], lr=lr, variant=variant, lora_scale=given)
        assert opt.pairs[0].scaling() == (s if given else 1.0)
        state, Ar, Br, g = {}, A0, B0, np.random.default_rng(2)
        for _ in range(4):
            G = g.standard_normal((m, n)) * np.exp(g.standard_normal(n))
            A.grad = torch.tensor(s * B.detach().numpy().T @ G)  # what autograd gives with scale s
            B.grad = torch.tensor(s * G @ A.detach().numpy().T)
            opt.step()
            Ar, Br = _ref_step(state, Ar, Br, G if given else s * G, given or 1.0, lr=lr, variant=variant)
            np.testing.assert_allclose(A.detach().numpy(), Ar, rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(B.detach().numpy(), Br, rtol=1e-8, atol=1e-10)
        runs[given] = B.detach().numpy() @ A.detach().numpy()
    moved_given, moved_default = runs[s] - B0 @ A0, runs[None] - B0 @ A0
    if variant == "adamw":
        np.testing.assert_allclose(moved_default, moved_given, rtol=1e-6, atol=1e-9)
    else:  # s = 1 takes steps s times larger (first order; the rebalance keeps B A's product)
        ratio = np.linalg.norm(moved_default) / np.linalg.norm(moved_given)
        assert 0.8 * s < ratio < 1.25 * s, ratio


# -- attach(model): exact energies ---------------------------------------------------------------
def test_attach_gives_the_model_built_optimizers_exact_energies_and_steps():
    model_a, model_b = make_lora_model(seed=3, alpha=12), make_lora_model(seed=3, alpha=12)
    listed = AdaPreLoRA(model_a.parameters(), lr=1e-2)
    assert listed.attach(model_a) is listed and listed.stats == "exact"
    assert [p.scaling() for p in listed.pairs] == [3.0] * 3  # PEFT's alpha / r, read from the layers
    built = AdaPreLoRA(model_b, lr=1e-2)
    for step in range(3):
        forward_backward(model_a, step)
        forward_backward(model_b, step)
        rows = {id(p.A): r for p, r in zip(listed.pairs, listed._collector.rows)}
        for p, r in zip(built.pairs, built._collector.rows):
            other = dict(zip(map(id, model_b.parameters()), model_a.parameters()))[id(p.A)]
            torch.testing.assert_close(rows[id(other)], r, rtol=1e-6, atol=1e-9)
        listed.step()
        built.step()
        listed.zero_grad()
        built.zero_grad()
    for (na, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=na)
    with pytest.raises(ValueError, match="not the weights of a Linear or Conv2d"):
        AdaPreLoRA(model_a.parameters(), lr=1e-2).attach(SimpleNet())
    with pytest.raises(ValueError, match="built with stats='raw'"):  # not silently switched to exact
        AdaPreLoRA(model_a.parameters(), lr=1e-2, stats="raw").attach(model_a)
    # PEFT's embedding LoRA: by order it looks like a pair, by name (and with the model) it gets AdamW
    from peft import LoraConfig, get_peft_model

    emb = get_peft_model(SimpleNet(), LoraConfig(r=2, target_modules=["emb", "lin0"]))
    assert len(AdaPreLoRA(emb.named_parameters(), lr=1e-2).attach(emb).pairs) == len(find_lora_pairs(emb)) == 1
    with pytest.raises(ValueError, match="embedding LoRA.*pairs_from='names'"):
        AdaPreLoRA(emb.parameters(), lr=1e-2).attach(emb)


def test_attach_hooks_a_kohya_network():
    te, unet, network = tiny_kohya_setup(seed=4)
    params, _ = network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    opt = AdaPreLoRA(params, lr=1e-3).attach(network)
    assert all(p.lora_A_module is m.lora_down for p, m in zip(opt.pairs, network.text_encoder_loras + network.unet_loras))
    kohya_loss(te, unet, 0).backward()
    assert all(r is not None for r in opt._collector.rows), "every kohya module was hooked"
    opt.step()


# -- saving and resuming -------------------------------------------------------------------------
_RESUME = textwrap.dedent("""
    import sys, torch
    from adaprelora import AdaPreLoRA
    from adaprelora.testing.kohya_network import kohya_loss, tiny_kohya_setup
    torch.set_num_threads(1)
    folder = sys.argv[1]
    te, unet, network = tiny_kohya_setup(seed=8, loraplus_lr_ratio=4.0)
    with torch.no_grad():  # other LoRA values: the checkpoint must bring them back
        for p in network.parameters():
            p.normal_()
    network.load_state_dict(torch.load(folder + "/network.pt", weights_only=True))
    params, _ = network.prepare_optimizer_params(5e-4, 2e-3, 1e-3)
    opt = AdaPreLoRA(params, lr=1e-3)
    opt.load_state_dict(torch.load(folder + "/optimizer.pt", weights_only=True))
    for step in range(3, 6):
        kohya_loss(te, unet, step).backward()
        opt.step()
        opt.zero_grad()
    torch.save(network.state_dict(), folder + "/resumed.pt")
""")


@pytest.mark.slow
def test_state_dict_round_trips_in_a_fresh_process_and_the_resumed_run_continues_exactly(tmp_path):
    te, unet, network = tiny_kohya_setup(seed=8, loraplus_lr_ratio=4.0)
    params, _ = network.prepare_optimizer_params(5e-4, 2e-3, 1e-3)
    opt = AdaPreLoRA(params, lr=1e-3)
    for step in range(6):
        if step == 3:  # what the trainers do: torch.save the optimizer and the LoRA weights
            torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
            torch.save(network.state_dict(), tmp_path / "network.pt")
        kohya_loss(te, unet, step).backward()
        opt.step()
        opt.zero_grad()
    assert len(opt.pairs) == 5 and len(opt.param_groups) == 4  # LoRA+: each pair spans two groups
    saved = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert {"adafactor_row", "adafactor_col", "exp_avg"} <= set().union(*saved["state"].values())
    script = tmp_path / "resume.py"
    script.write_text(_RESUME)
    root = str(Path(__file__).resolve().parents[1])  # the fresh process imports this checkout's adaprelora
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=120, cwd=root,
                   env={**os.environ, "PYTHONPATH": root})
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for name, value in network.state_dict().items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ScaledLoRA", "LoRAPro"])
def test_the_baselines_read_parameter_lists_too(name):
    """The preconditioned baselines share the discovery; with the layers' scale given they step
    exactly as when built from the model."""
    import adaprelora

    cls = getattr(adaprelora, name)
    model_a, model_b = make_lora_model(seed=6), make_lora_model(seed=6)  # alpha / r = 2
    listed = cls(model_a.parameters(), lr=1e-2, lora_scale=2.0)
    built = cls(model_b, lr=1e-2)
    assert _ids(listed.pairs) == _ids(find_lora_pairs(model_a)) and len(listed.pairs) == 3
    for step in range(2):
        for model, opt in ((model_a, listed), (model_b, built)):
            forward_backward(model, step)
            opt.step()
            opt.zero_grad()
    for (na, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=na)
