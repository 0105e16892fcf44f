"""The optimizers users pick instead of AdaPreLoRA (prodigy, adafactor, schedule-free, adamw8bit,
lora-rite):
the factory builds each from its own package with the documented settings (the same parameters as
the package's optimizer stepped by hand), each lowers a loss, a missing package is one clear line,
and the trainers' train/eval switching of Schedule-Free AdamW."""
import sys
import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from adaprelora import available_optimizers, create_optimizer
from adaprelora.testing.lora_models import batch, forward_backward, make_lora_model
from adaprelora.training.errors import UserError
from adaprelora.training.options import build_optimizer, optimizer_mode

NEW = ["prodigy", "adafactor", "schedule-free", "adamw8bit", "lora-rite"]


def _package_optimizer(name, params, lr, weight_decay):
    """Each optimizer built by hand from its package, with the settings the factory documents."""
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, weight_decay=weight_decay, use_bias_correction=True, safeguard_warmup=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=weight_decay, relative_step=False, scale_parameter=False,
                         warmup_init=False)
    if name == "schedule-free":
        from schedulefree import AdamWScheduleFree

        opt = AdamWScheduleFree(params, lr=lr, weight_decay=weight_decay)
        opt.train()
        return opt
    if name == "adamw8bit":
        from bitsandbytes.optim import AdamW8bit

        return AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "lora-rite":  # params come as lora_A, lora_B of each layer, the order it pairs them in
        from pytorch_optimizer.optimizer.lora_rite import LoRARite

        return LoRARite(params, lr=lr, weight_decay=weight_decay, lora_r_dim=1)
    raise AssertionError(name)


class Wide(nn.Module):
    """Two Linear layers wide enough (A is 32 x 128) for bitsandbytes' 8-bit state (>= 4096 elements)."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(128, 128)
        self.lin1 = nn.Linear(128, 8)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


def _wide_lora(seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(Wide(), LoraConfig(r=32, lora_alpha=32, target_modules=["lin0", "lin1"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.02)
    return model


def _wide_loss(model, seed=0, backward=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 128, generator=g)
    y = torch.sin(x[:, :8] * 2)
    loss = ((model(x) - y) ** 2).mean()
    if backward:
        loss.backward()
    return loss.detach()


def test_the_new_names_are_listed_after_the_project_methods():
    assert available_optimizers()[-len(NEW):] == NEW


@pytest.mark.parametrize("name", NEW)
def test_factory_wiring_equals_the_package_optimizer_stepped_by_hand(name):
    lr = {"prodigy": 1.0, "adafactor": 1e-2, "schedule-free": 1e-2, "adamw8bit": 1e-2, "lora-rite": 1e-2}[name]
    ours, theirs = _wide_lora(seed=1), _wide_lora(seed=1)
    opt = create_optimizer(name, ours, lr=lr, weight_decay=0.01)
    ref = _package_optimizer(name, [p for p in theirs.parameters() if p.requires_grad], lr, 0.01)
    assert type(opt) is type(ref)
    for step in range(6):
        for model, o in ((ours, opt), (theirs, ref)):
            _wide_loss(model, seed=step)
            o.step()
            o.zero_grad()
    if name == "schedule-free":
        opt.eval()
        ref.eval()
    moved = False
    for (n, p), (_, q), p0 in zip(ours.named_parameters(), theirs.named_parameters(), _wide_lora(seed=1).parameters()):
        assert torch.equal(p, q), f"{name}: {n} differs from the package's own optimizer"
        moved |= p.requires_grad and not torch.equal(p, p0)
    assert moved, f"{name}: nothing moved"
    if name == "prodigy":  # the documented settings reached the package
        g = opt.param_groups[0]
        assert g["use_bias_correction"] and g["safeguard_warmup"] and g["decouple"] and g["weight_decay"] == 0.01
    if name == "adafactor":
        g = opt.param_groups[0]
        assert (g["relative_step"], g["scale_parameter"], g["warmup_init"], g["lr"]) == (False, False, False, lr)


@pytest.mark.parametrize("name, lr, steps", [("prodigy", 1.0, 100), ("adafactor", 1e-2, 40),
                                             ("schedule-free", 1e-2, 40), ("adamw8bit", 1e-2, 40),
                                             ("lora-rite", 1e-2, 40)])
def test_each_lowers_the_loss_of_a_lora_regression(name, lr, steps):
    """Prodigy starts from a step size d0 = 1e-6 and grows it (about 2x per 5 steps here), hence
    more steps."""
    model = _wide_lora(seed=2)
    opt = create_optimizer(name, model, lr=lr)
    losses = []
    for _ in range(steps):
        losses.append(_wide_loss(model, seed=0).item())
        opt.step()
        opt.zero_grad()
    optimizer_mode(opt, train=False)  # schedule-free: evaluate the averaged weights
    with torch.no_grad():
        final = _wide_loss(model, seed=0, backward=False).item()
    assert final < 0.5 * losses[0], f"{name}: {losses[0]:.4f} -> {final:.4f}"


def test_adamw8bit_keeps_8_bit_moments_for_large_tensors_on_this_device():
    model = _wide_lora()
    opt = create_optimizer("adamw8bit", model, lr=1e-3)
    _wide_loss(model)
    opt.step()
    A = model.base_model.model.lin0.lora_A.default.weight
    assert A.numel() >= 4096 and opt.state[A]["state1"].dtype == torch.uint8
    bias = model.base_model.model.lin1.lora_B.default.weight  # 8 x 32: under 4096, 32-bit state
    assert opt.state[bias]["state1"].dtype == torch.float32


@pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)
def test_adamw8bit_on_cuda_matches_the_package():
    ours, theirs = _wide_lora(seed=3).cuda(), _wide_lora(seed=3).cuda()
    opt = create_optimizer("adamw8bit", ours, lr=1e-2)
    ref = _package_optimizer("adamw8bit", [p for p in theirs.parameters() if p.requires_grad], 1e-2, 0.01)
    for step in range(3):
        for model, o in ((ours, opt), (theirs, ref)):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(64, 128, generator=g).cuda()
            (model(x) ** 2).mean().backward()
            o.step()
            o.zero_grad()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name, module, pin", [("prodigy", "prodigyopt", "prodigyopt==1.1.2"),
                                               ("schedule-free", "schedulefree", "schedulefree==1.4.1"),
                                               ("adamw8bit", "bitsandbytes", "bitsandbytes==0.50.2"),
                                               ("lora-rite", "pytorch_optimizer", "pytorch-optimizer==4.1.0")])
def test_a_missing_package_is_one_line_naming_the_pip_command(name, module, pin, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ImportError, match=f"needs the {module} package: pip install {pin}"):
        create_optimizer(name, make_lora_model(), lr=1e-3)
    with pytest.raises(UserError) as err:
        build_optimizer(name, make_lora_model(), 1e-3, {})
    assert str(err.value).count("\n") == 0 and f"pip install {pin}" in str(err.value)


def test_lora_rite_refuses_trainable_tensors_outside_pairs_in_one_line():
    """The package pairs consecutive parameters: a trainable norm would be paired with a LoRA factor."""
    with pytest.raises(ValueError, match=r"outside pairs \(e\.g\. .*norm"):
        create_optimizer("lora-rite", make_lora_model(modules_to_save=["norm"]), lr=1e-3)
    with pytest.raises(UserError) as err:
        build_optimizer("lora-rite", make_lora_model(modules_to_save=["norm"]), 1e-3, {})
    assert str(err.value).count("\n") == 0 and "freeze them or pick another optimizer" in str(err.value)


def test_prodigy_warns_when_its_lr_is_far_below_the_documented_one():
    with pytest.warns(UserWarning, match="documented value is 1.0"):
        create_optimizer("prodigy", make_lora_model(), lr=1e-4)


def test_schedule_free_modes_through_the_shared_helper():
    """`optimizer_mode` reaches through accelerate's wrapper; eval puts x = lerp(y, z) in the
    parameters, train puts y back; other optimizers ignore it."""
    from accelerate import Accelerator

    from adaprelora.training.loop import release_accelerator

    acc = Accelerator(cpu=True)
    try:
        _check_modes(acc)
    finally:
        release_accelerator(acc)


def _check_modes(acc):
    model = make_lora_model(seed=4)
    opt = create_optimizer("schedule-free", model, lr=1e-2)
    for step in range(3):
        forward_backward(model, step)
        opt.step()
        opt.zero_grad()
    wrapped = acc.prepare_optimizer(opt)
    params = [p for p in model.parameters() if p.requires_grad]
    y = [p.detach().clone() for p in params]
    optimizer_mode(wrapped, train=False)
    assert not opt.param_groups[0]["train_mode"]
    beta1 = opt.param_groups[0]["betas"][0]
    for p, y_ in zip(params, y):
        z = opt.state[p]["z"]
        torch.testing.assert_close(p, torch.lerp(y_, z, 1 - 1 / beta1))
        assert not torch.allclose(p, y_)
    optimizer_mode(wrapped, train=True)
    for p, y_ in zip(params, y):
        torch.testing.assert_close(p, y_, rtol=1e-6, atol=1e-7)
    adamw = create_optimizer("adamw", model, lr=1e-3)
    optimizer_mode(adamw, train=False)  # no modes: nothing happens, nothing raises


def test_training_steps_leave_schedule_free_in_eval_mode_at_every_event():
    """What trainers do between events (checkpoints, samples, evaluation, export) sees the
    averaged weights; each step runs in train mode (step() raises otherwise)."""
    from accelerate import Accelerator

    from adaprelora.training.loop import release_accelerator, training_steps

    acc = Accelerator(cpu=True)
    try:
        model = make_lora_model(seed=5)
        data = [{"seed": i} for i in range(4)]
        loader = torch.utils.data.DataLoader(data, batch_size=1, collate_fn=lambda rows: rows[0])
        opt = create_optimizer("schedule-free", model, lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
        modes = []
        steps = training_steps(acc, models=[model], dataloader=loader, optimizer=opt, lr_scheduler=sched,
                               compute_loss=lambda b: _sf_loss(model, b["seed"]), start_step=0, max_steps=3,
                               updates_per_epoch=4, stop_event=threading.Event())
        for event in steps:
            modes.append((event.step, opt.optimizer.param_groups[0]["train_mode"]))
        assert modes == [(1, False), (2, False), (3, False)]
    finally:
        release_accelerator(acc)


def _sf_loss(model, seed):
    ids, img, y = batch(seed)
    return ((model(ids, img) - y) ** 2).mean()
