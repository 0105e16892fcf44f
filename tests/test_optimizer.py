"""AdaPreLoRA as a torch.optim.Optimizer: whole steps against an explicit float64 reference,
exact energies against the explicit weight gradient, state_dict, schedulers, dtypes, edge cases."""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from adaprelora import AdaPreLoRA, create_optimizer, find_lora_pairs
from adaprelora.testing.lora_models import SimpleNet, batch, forward_backward, make_lora_model


# ---------------------------------------------------------------------------------------------
# An independent single-pair reference of spec section 3, written with explicit matrices.
def _ref_step(state, A, B, G, s, *, lr, variant, clip=1.0, damping=0.1, decay=-0.8, betas=(0.9, 0.999),
              eps=1e-8, wd=0.0, momentum=0.0, stats="tangent", ema_before_solve=False, lr_B=None):
    """lr_B: B's learning rate when it differs from A's (B in its own param group)."""
    lr_B = lr if lr_B is None else lr_B
    m, r = B.shape
    n = A.shape[1]
    gA, gB = B.T @ G, G @ A.T
    tiny = np.finfo(np.float32).tiny

    def inv_ridge(M):
        return np.linalg.inv(M + (damping * np.trace(M) / r + tiny) * np.eye(r))

    if stats == "raw":  # the paper's surrogate of G, formed explicitly
        E = (gB @ A + B @ gA) ** 2
    else:
        PB = B @ inv_ridge(B.T @ B) @ B.T
        PA = A.T @ inv_ridge(A @ A.T) @ A
        GT = PB @ G + G @ PA - PB @ G @ PA
        E = GT ** 2
    t = state["t"] = state.get("t", 0) + 1
    if ema_before_solve:  # bias-corrected EMA of the factor gradients, fed to the solve
        state["eA"] = betas[0] * state.get("eA", 0) + (1 - betas[0]) * gA
        state["eB"] = betas[0] * state.get("eB", 0) + (1 - betas[0]) * gB
        gA, gB = state["eA"] / (1 - betas[0] ** t), state["eB"] / (1 - betas[0] ** t)
    beta2 = 1 - t ** decay
    state["R"] = beta2 * state.get("R", 0) + (1 - beta2) * (E.sum(1) / n + 1e-30)
    state["C"] = beta2 * state.get("C", 0) + (1 - beta2) * (E.sum(0) / m + 1e-30)
    P = np.diag(np.sqrt(state["R"] / state["R"].mean()))
    Q = np.diag(np.sqrt(state["C"]))
    MB = B.T @ P @ B
    MA = A @ Q @ A.T
    MBi = inv_ridge(MB)
    MAi = inv_ridge(MA)
    K = gA @ A.T
    dA = MBi @ (gA @ np.linalg.inv(Q) - 0.5 * K @ MAi @ A)
    dB = (np.linalg.inv(P) @ gB - 0.5 * B @ MBi @ K) @ MAi
    rms = np.sqrt(((B @ dA + dB @ A) ** 2).mean())
    if clip is not None and rms > clip:
        dA, dB = dA * clip / rms, dB * clip / rms
    if variant == "adamw":
        out = []
        for name, x, d, rate in (("A", A, dA, lr), ("B", B, dB, lr_B)):
            mo = state[name + "m"] = betas[0] * state.get(name + "m", 0) + (1 - betas[0]) * d
            v = state[name + "v"] = betas[1] * state.get(name + "v", 0) + (1 - betas[1]) * d * d
            mh, vh = mo / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
            out.append(x * (1 - rate * wd) - rate * mh / (np.sqrt(vh) + eps))
        return out
    if momentum:
        dA = state["bA"] = dA if t == 1 else momentum * state["bA"] + dA
        dB = state["bB"] = dB if t == 1 else momentum * state["bB"] + dB
    A2 = A * (1 - lr * wd) - lr / s * dA
    B2 = B * (1 - lr_B * wd) - lr_B / s * dB
    c = np.sqrt(np.linalg.norm(A2) / np.linalg.norm(B2))
    if momentum:
        state["bA"], state["bB"] = state["bA"] / c, state["bB"] * c
    if ema_before_solve:  # gA = B^T G and gB = G A^T follow the rebalanced factors
        state["eA"], state["eB"] = state["eA"] * c, state["eB"] / c
    return A2 / c, B2 * c


@pytest.mark.parametrize("variant,momentum,wd", [("adamw", 0.0, 0.0), ("adamw", 0.0, 0.05), ("sgd", 0.0, 0.0), ("sgd", 0.9, 0.01)])
def test_whole_steps_match_the_explicit_float64_reference(variant, momentum, wd):
    rng = np.random.default_rng(0)
    m, n, r, s = 9, 7, 3, 1.7
    A0, B0 = rng.standard_normal((r, n)), rng.standard_normal((m, r))
    A = nn.Parameter(torch.tensor(A0))
    B = nn.Parameter(torch.tensor(B0))
    lr = 0.05 if variant == "adamw" else 0.02
    opt = AdaPreLoRA([A, B], lr=lr, variant=variant, stats="tangent", momentum=momentum, weight_decay=wd,
                     pairs=[(A, B, s)])
    state, Ar, Br = {}, A0, B0
    for step in range(4):
        G = rng.standard_normal((m, n)) * np.exp(rng.standard_normal(n))  # column scales differ
        A.grad = torch.tensor(s * B.detach().numpy().T @ G)
        B.grad = torch.tensor(s * G @ A.detach().numpy().T)
        opt.step()
        Ar, Br = _ref_step(state, Ar, Br, G, s, lr=lr, variant=variant, momentum=momentum, wd=wd)
        np.testing.assert_allclose(A.detach().numpy(), Ar, rtol=1e-8, atol=1e-10, err_msg=f"A at step {step}")
        np.testing.assert_allclose(B.detach().numpy(), Br, rtol=1e-8, atol=1e-10, err_msg=f"B at step {step}")


@pytest.mark.parametrize("variant,stats,ema", [("adamw", "raw", False), ("sgd", "raw", False), ("sgd", "tangent", True),
                                              ("sgd", "raw", True)])
def test_ablation_options_match_the_explicit_float64_reference(variant, stats, ema):
    """stats="raw" (energies of gB A + B gA) and momentum_before_solve (an EMA of the factor
    gradients fed to the solve), step by step against the explicit reference."""
    rng = np.random.default_rng(3)
    m, n, r, s = 8, 6, 2, 0.8
    A0, B0 = rng.standard_normal((r, n)), rng.standard_normal((m, r))
    A, B = nn.Parameter(torch.tensor(A0)), nn.Parameter(torch.tensor(B0))
    lr = 0.05 if variant == "adamw" else 0.02
    opt = AdaPreLoRA([A, B], lr=lr, variant=variant, stats=stats, momentum_before_solve=ema, pairs=[(A, B, s)])
    state, Ar, Br = {}, A0, B0
    for step in range(5):
        G = rng.standard_normal((m, n)) * np.exp(rng.standard_normal(n))
        A.grad = torch.tensor(s * B.detach().numpy().T @ G)
        B.grad = torch.tensor(s * G @ A.detach().numpy().T)
        opt.step()
        Ar, Br = _ref_step(state, Ar, Br, G, s, lr=lr, variant=variant, stats=stats, ema_before_solve=ema)
        np.testing.assert_allclose(A.detach().numpy(), Ar, rtol=1e-8, atol=1e-10, err_msg=f"A at step {step}")
        np.testing.assert_allclose(B.detach().numpy(), Br, rtol=1e-8, atol=1e-10, err_msg=f"B at step {step}")
    # the options change the trajectory (else the test could not tell them from the default)
    st0, A_def, B_def = {}, A0, B0
    rng = np.random.default_rng(3)
    rng.standard_normal((r, n)), rng.standard_normal((m, r))
    for _ in range(5):
        G = rng.standard_normal((m, n)) * np.exp(rng.standard_normal(n))
        A_def, B_def = _ref_step(st0, A_def, B_def, G, s, lr=lr, variant=variant)
    assert not np.allclose(A_def, Ar, rtol=1e-4)


def test_momentum_before_solve_state_round_trips_and_is_refused_outside_sgd():
    model = make_lora_model(seed=0)
    with pytest.raises(ValueError, match="momentum_before_solve"):
        AdaPreLoRA(model, lr=1e-3, momentum_before_solve=True)
    opt = AdaPreLoRA(model, lr=1e-2, variant="sgd", momentum_before_solve=True)
    forward_backward(model, 0)
    opt.step()
    twin = copy.deepcopy(model)
    opt2 = AdaPreLoRA(twin, lr=1e-2, variant="sgd", momentum_before_solve=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert any("grad_ema" in k for st in opt.state.values() for k in st)
    for m_, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        forward_backward(m_, 1)
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_clipping_engages_in_the_reference_comparison():
    """Same as above with a tiny clip threshold, so the clip branch is exercised."""
    rng = np.random.default_rng(1)
    A0, B0 = rng.standard_normal((2, 6)), rng.standard_normal((5, 2))
    A, B = nn.Parameter(torch.tensor(A0)), nn.Parameter(torch.tensor(B0))
    opt = AdaPreLoRA([A, B], lr=0.01, variant="sgd", stats="tangent", clip_threshold=1e-3, pairs=[(A, B, 1.0)])
    G = rng.standard_normal((5, 6))
    A.grad, B.grad = torch.tensor(B0.T @ G), torch.tensor(G @ A0.T)
    opt.step()
    Ar, Br = _ref_step({}, A0, B0, G, 1.0, lr=0.01, variant="sgd", clip=1e-3)
    np.testing.assert_allclose(A.detach().numpy(), Ar, rtol=1e-8)
    np.testing.assert_allclose(B.detach().numpy(), Br, rtol=1e-8)
    Au, Bu = _ref_step({}, A0, B0, G, 1.0, lr=0.01, variant="sgd", clip=None)
    assert not np.allclose(Au, Ar), "the clip did not change the step: test would not catch a missing clip"


# ---------------------------------------------------------------------------------------------
def _explicit_weight_gradients(model, seed):
    """dL/dW_eff for every adapted layer, by merging the LoRA into a plain copy and backpropagating."""
    merged = copy.deepcopy(model).merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    layers = {"lin0": merged.lin0, "lin1": merged.lin1, "conv": merged.conv}
    for layer in layers.values():
        layer.weight.requires_grad_(True)
    forward_backward(merged, seed)
    return {k: v.weight.grad.reshape(v.weight.shape[0], -1) for k, v in layers.items()}


def test_exact_energies_equal_those_of_the_explicit_weight_gradient_including_conv():
    model = make_lora_model(seed=1, dtype=torch.float64)
    opt = AdaPreLoRA(model, lr=1e-3)
    forward_backward(model, seed=3)
    explicit = _explicit_weight_gradients(model, seed=3)
    rows, cols = opt._collector.take(range(len(opt.pairs)))
    assert len(opt.pairs) == 3
    for pair, row, col in zip(opt.pairs, rows, cols):
        G = explicit[pair.name.split(".")[-2]]
        torch.testing.assert_close(row, (G ** 2).sum(1), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(col, (G ** 2).sum(0), rtol=1e-9, atol=1e-12)


def test_exact_energies_add_up_over_micro_batches_and_reset_on_zero_grad():
    model = make_lora_model(seed=2, dtype=torch.float64)
    opt = AdaPreLoRA(model, lr=1e-3)
    forward_backward(model, seed=0)
    first = [r.clone() for r in opt._collector.take(range(3))[0]]
    forward_backward(model, seed=1)
    both = opt._collector.take(range(3))[0]
    opt.zero_grad()
    forward_backward(model, seed=1)
    second = opt._collector.take(range(3))[0]
    for a, b, ab in zip(first, second, both):
        torch.testing.assert_close(ab, a + b)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_energies(reentrant):
    from torch.utils.checkpoint import checkpoint

    class Ckpt(SimpleNet):
        def forward(self, ids, img=None):
            h = self.norm(self.emb(ids)).requires_grad_()  # reentrant checkpointing needs a grad input
            h = checkpoint(lambda t: self.lin1(torch.relu(self.lin0(t))), h, use_reentrant=reentrant).mean(1)
            return h + self.conv(img).mean((1, 2, 3))[:, None]

    energies = []
    for cls in (SimpleNet, Ckpt):
        torch.manual_seed(0)
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(cls().double(), LoraConfig(r=3, target_modules=["lin0", "lin1", "conv"]))
        opt = AdaPreLoRA(model, lr=1e-3)
        forward_backward(model, seed=5)
        energies.append(opt._collector.take(range(3))[0])
    for a, b in zip(*energies):
        torch.testing.assert_close(a, b)


def test_fp16_loss_scale_is_divided_out_of_the_energies():
    results = []
    for use_scaler in (False, True):
        model = make_lora_model(seed=4)
        opt = AdaPreLoRA(model, lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if use_scaler else None
        if scaler:
            opt.set_grad_scaler(scaler)
        for step in range(3):
            ids, img, y = batch(step)
            loss = ((model(ids, img) - y) ** 2).mean()
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            opt.zero_grad()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adaprelora", "adaprelora-sgd", "scaled-gd", "scaled-adamw", "lora-pro",
                                  "adamw", "loraplus", "prodigy", "adafactor", "schedule-free", "adamw8bit"])
def test_state_dict_round_trip_reproduces_the_next_step_exactly(name):
    kw = {"stats": "tangent"} if name == "adaprelora-sgd" else {}
    if name == "adaprelora-sgd":
        kw["momentum"] = 0.5
    model = make_lora_model(seed=5, modules_to_save=["norm"])
    opt = create_optimizer(name, model, lr=1e-2, **kw)
    for step in range(3):
        forward_backward(model, step)
        opt.step()
        opt.zero_grad()
    twin = copy.deepcopy(model)
    saved = copy.deepcopy(opt.state_dict())
    twin_opt = create_optimizer(name, twin, lr=1e-2, **kw)
    twin_opt.load_state_dict(saved)
    for m_, o_ in ((model, opt), (twin, twin_opt)):
        forward_backward(m_, 7)
        o_.step()
    for (n1, p1), (_, p2) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p1, p2), f"{name}: {n1} differs after a state_dict round trip"


def test_state_is_adamw_plus_m_plus_n_floats_per_pair_and_keyed_by_parameter():
    model = make_lora_model(seed=6)
    opt = AdaPreLoRA(model, lr=1e-3)
    ref_model = make_lora_model(seed=6)
    ref = torch.optim.AdamW([p for p in ref_model.parameters() if p.requires_grad], lr=1e-3)
    for m_, o_ in ((model, opt), (ref_model, ref)):
        forward_backward(m_, 0)
        o_.step()

    def floats(o):
        return sum(t.numel() for st in o.state.values() for k, t in st.items() if k != "step")

    extra = sum(p.m + p.n for p in opt.pairs)
    assert floats(opt) == floats(ref) + extra
    assert all(isinstance(k, nn.Parameter) for k in opt.state)
    assert set(opt.state_dict()["state"]) <= set(range(len(opt.param_groups[0]["params"])))


def test_bf16_model_trains_and_keeps_fp32_state_through_a_round_trip():
    model = make_lora_model(seed=7, dtype=torch.bfloat16)
    opt = AdaPreLoRA(model, lr=1e-2)
    losses = []
    for _ in range(25):
        ids, img, y = batch(0)
        loss = ((model(ids, img.bfloat16()).float() - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    opt2 = AdaPreLoRA(copy.deepcopy(model), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    pair = opt2.pairs[0]
    assert opt2.state[pair.B]["adafactor_row"].dtype == torch.float32
    assert opt2.state[pair.A]["exp_avg"].dtype == torch.float32


def test_float16_model_trains_on_cpu():
    model = make_lora_model(seed=7, dtype=torch.float16, targets=("lin0", "lin1"))
    opt = AdaPreLoRA(model, lr=1e-2)
    ids, img, y = batch(0, with_img=False)
    first = None
    for _ in range(15):
        loss = ((model(ids).float() - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else loss.item()
    assert loss.item() < first and all(torch.isfinite(p).all() for p in model.parameters())


def test_lr_scheduler_drives_the_step_size():
    model = make_lora_model(seed=8)
    opt = AdaPreLoRA(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 2 else 0.0)
    for step in range(4):
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        forward_backward(model, step)
        opt.step()
        opt.zero_grad()
        sched.step()
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        moved = any(not torch.equal(a, b) for a, b in zip(before, after))
        assert moved == (step < 2), f"step {step}: lr {opt.param_groups[0]['lr']}"


def test_closure_is_evaluated_and_its_loss_returned():
    model = make_lora_model(seed=9)
    opt = AdaPreLoRA(model, lr=1e-2)
    calls = []

    def closure():
        opt.zero_grad()
        loss = forward_backward(model, 0)
        calls.append(loss)
        return loss

    before = model.base_model.model.lin0.lora_A["default"].weight.detach().clone()
    loss = opt.step(closure)
    assert len(calls) == 1 and torch.equal(loss, calls[0])
    assert not torch.equal(before, model.base_model.model.lin0.lora_A["default"].weight)


def test_nonfinite_gradient_leaves_that_pair_and_its_state_untouched_and_warns_once():
    model = make_lora_model(seed=10)
    opt = AdaPreLoRA(model, lr=1e-2)
    forward_backward(model, 0)
    opt.step()
    opt.zero_grad()
    bad, good = opt.pairs[0], opt.pairs[1]
    snap = {k: v.clone() for k, v in opt.state[bad.A].items()}
    A_bad, A_good = bad.A.detach().clone(), good.A.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            forward_backward(model, 1)
            bad.A.grad[0, 0] = float("nan")
            opt.step()
            opt.zero_grad()
    assert sum("non-finite" in str(w.message) for w in caught) == 1
    assert torch.equal(bad.A, A_bad)
    assert not torch.equal(good.A, A_good)
    for k, v in snap.items():
        assert torch.equal(opt.state[bad.A][k], v), k
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_gradient_with_finite_energies_skips_only_its_pair_exactly():
    """With finite exact energies the step checks the gradients through its own Grams instead of a
    separate pass; a NaN found there must leave the other pairs of the bucket with exactly the
    step they take when that pair has no gradient at all, and the bad pair and its state untouched."""
    from peft import LoraConfig, get_peft_model

    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
        model = get_peft_model(net, LoraConfig(r=2, lora_alpha=2, target_modules=["0", "1", "2"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.1)
        return model, AdaPreLoRA(model, lr=1e-2, weight_decay=0.01)

    runs = [make(), make()]
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        for i, (model, opt) in enumerate(runs):
            model(x * (1 + step)).pow(2).mean().backward()
            bad = opt.pairs[1]
            if step == 1 and i == 0:
                bad.A.grad[0, 0] = float("nan")
                before = bad.A.detach().clone(), {k: v.clone() for k, v in opt.state[bad.A].items()}
            elif step == 1:
                bad.A.grad = bad.B.grad = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
            opt.zero_grad()
            if step == 1 and i == 0:
                assert torch.equal(bad.A, before[0])
                for key, value in before[1].items():
                    assert torch.equal(opt.state[bad.A][key], value), key
    (_, nan_opt), (_, none_opt) = runs
    assert len(nan_opt._buckets) == 1 and nan_opt.stats == "exact"
    for p, q in zip(nan_opt.pairs, none_opt.pairs):
        for t, u in ((p.A, q.A), (p.B, q.B)):
            assert torch.equal(t, u)
            for key, value in nan_opt.state[t].items():
                assert torch.equal(none_opt.state[u][key], value), key
    assert nan_opt.state[nan_opt.pairs[1].A]["step"] == 2 and nan_opt.state[nan_opt.pairs[0].A]["step"] == 3


def test_nonfinite_raise_mode_raises():
    model = make_lora_model(seed=10)
    opt = AdaPreLoRA(model, lr=1e-2, nonfinite="raise")
    forward_backward(model, 0)
    opt.pairs[0].B.grad.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()


def test_model_without_lora_is_a_clear_value_error():
    with pytest.raises(ValueError, match="lora_A/lora_B"):
        AdaPreLoRA(SimpleNet(), lr=1e-3)


def test_exact_stats_without_a_model_suggests_tangent():
    A, B = nn.Parameter(torch.randn(2, 5)), nn.Parameter(torch.randn(4, 2))
    with pytest.raises(ValueError, match="stats='tangent'"):
        AdaPreLoRA([A, B], lr=1e-3, stats="exact", pairs=[(A, B, 1.0)])


def test_bare_parameter_lists_with_pairs_and_param_groups():
    A1, B1 = nn.Parameter(torch.randn(2, 5)), nn.Parameter(torch.randn(4, 2))
    A2, B2 = nn.Parameter(torch.randn(3, 6)), nn.Parameter(torch.randn(6, 3))
    bias = nn.Parameter(torch.zeros(4))
    opt = AdaPreLoRA([{"params": [A1, B1, bias]}, {"params": [A2, B2], "lr": 0.0}], lr=0.1,
                     pairs=[(A1, B1, 2.0), (A2, B2, 1.0)])
    assert opt.stats == "tangent"
    A2_before = A2.detach().clone()
    for p in (A1, B1, A2, B2, bias):
        p.grad = torch.randn_like(p)
    opt.step()
    assert torch.equal(A2, A2_before), "group lr=0 must freeze its pairs"
    assert bias.abs().sum() > 0, "a tensor outside pairs gets AdamW"
    with pytest.raises(ValueError, match="rank mismatch"):
        AdaPreLoRA([A1, B2], lr=0.1, pairs=[(A1, B2, 1.0)])


@pytest.mark.parametrize("variant", ["adamw", "sgd"])
def test_pair_split_over_param_groups_steps_B_with_its_groups_lr(variant):
    """kohya's LoRA+ puts every B (lora_up) in a group of its own with lr * ratio: B's factor
    update uses B's group lr (its weight decay step included), the groups' common settings the
    rest; a pair whose factors share one group is bucketed apart from it even at equal shapes."""
    rng = np.random.default_rng(4)
    m, n, r, s = 9, 7, 3, 1.3
    A0, B0 = rng.standard_normal((r, n)), rng.standard_normal((m, r))
    A, B = nn.Parameter(torch.tensor(A0)), nn.Parameter(torch.tensor(B0))
    A2, B2 = nn.Parameter(torch.tensor(A0)), nn.Parameter(torch.tensor(B0))  # same pair, one group
    lr, ratio, wd = (0.02, 4.0, 0.05) if variant == "adamw" else (0.01, 3.0, 0.02)
    opt = AdaPreLoRA([{"params": [A, A2, B2]}, {"params": [B], "lr": lr * ratio}],
                     lr=lr, variant=variant, weight_decay=wd, pairs=[(A, B, s), (A2, B2, s)])
    state, Ar, Br, same, Asr, Bsr = {}, A0, B0, {}, A0, B0
    for step in range(4):
        G = rng.standard_normal((m, n)) * np.exp(rng.standard_normal(n))
        for a, b in ((A, B), (A2, B2)):
            a.grad = torch.tensor(s * b.detach().numpy().T @ G)
            b.grad = torch.tensor(s * G @ a.detach().numpy().T)
        opt.step()
        Ar, Br = _ref_step(state, Ar, Br, G, s, lr=lr, lr_B=lr * ratio, variant=variant, wd=wd)
        Asr, Bsr = _ref_step(same, Asr, Bsr, G, s, lr=lr, variant=variant, wd=wd)
        np.testing.assert_allclose(A.detach().numpy(), Ar, rtol=1e-8, atol=1e-10, err_msg=f"A at step {step}")
        np.testing.assert_allclose(B.detach().numpy(), Br, rtol=1e-8, atol=1e-10, err_msg=f"B at step {step}")
        np.testing.assert_allclose(A2.detach().numpy(), Asr, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(B2.detach().numpy(), Bsr, rtol=1e-8, atol=1e-10)
    assert not np.allclose(Ar, Asr, rtol=1e-4)  # B's lr changed the trajectory
    assert len(opt._buckets) == 2


def test_cache_sized_buckets_step_exactly_like_one_bucket():
    """On a CPU a bucket is stepped in runs of CPU_BUCKET_BYTES; the split must not change a
    step, a skipped pair or the state."""
    g = torch.Generator().manual_seed(3)
    m, n, r, k = 7, 9, 3, 6

    def make(limit):
        As = [nn.Parameter(torch.randn(r, n, generator=torch.Generator().manual_seed(i))) for i in range(k)]
        Bs = [nn.Parameter(torch.randn(m, r, generator=torch.Generator().manual_seed(50 + i)) * 0.1) for i in range(k)]
        opt = AdaPreLoRA(As + Bs, lr=1e-2, weight_decay=0.01, pairs=[(a, b, 0.5) for a, b in zip(As, Bs)])
        if limit:
            opt.CPU_BUCKET_BYTES = limit
        return As, Bs, opt

    whole, split = make(None), make(2 * 2 * r * (m + n) * 4)  # two pairs per run
    for step in range(3):
        grads = [torch.randn(r, n, generator=g) for _ in range(k)] + [torch.randn(m, r, generator=g) for _ in range(k)]
        if step == 1:
            grads[4][0, 0] = float("nan")  # pair 4 skipped, in the third run
        for As, Bs, opt in (whole, split):
            for p, grad in zip(As + Bs, grads):
                p.grad = grad.clone()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
    assert len(whole[2]._buckets) == 1 and len(split[2]._buckets) == 3
    for p, q in zip(whole[0] + whole[1], split[0] + split[1]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key, value in whole[2].state[p].items():
            torch.testing.assert_close(split[2].state[q][key], value, rtol=1e-6, atol=1e-7)
    assert whole[2].state[whole[0][4]]["step"] == 2 and whole[2].state[whole[0][3]]["step"] == 3


def test_non_lora_trainable_tensors_get_plain_adamw():
    model = make_lora_model(seed=11, modules_to_save=["norm"])
    opt = AdaPreLoRA(model, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.01)
    norm_w = [p for n, p in model.named_parameters() if "modules_to_save" in n and n.endswith("weight")][0]
    ref_p = nn.Parameter(norm_w.detach().clone())
    ref = torch.optim.AdamW([ref_p], lr=1e-2, betas=(0.8, 0.95), weight_decay=0.01)
    for step in range(3):
        forward_backward(model, step)
        ref_p.grad = norm_w.grad.clone()
        opt.step()
        ref.step()
        opt.zero_grad()
    torch.testing.assert_close(norm_w.detach(), ref_p.detach(), rtol=1e-6, atol=1e-7)


def test_rslora_and_dora_are_handled():
    model = make_lora_model(seed=12, r=4, alpha=8, use_rslora=True)
    assert all(abs(p.scaling() - 8 / 2.0) < 1e-12 for p in find_lora_pairs(model))
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    dora = get_peft_model(SimpleNet(), LoraConfig(r=2, target_modules=["lin0", "lin1"], use_dora=True))
    opt = AdaPreLoRA(dora, lr=1e-2)
    assert len(opt.pairs) == 2 and not any("magnitude" in p.name for p in opt.pairs)
    mag = [p for n, p in dora.named_parameters() if "magnitude" in n][0]
    before = mag.detach().clone()
    forward_backward(dora, 0, with_img=False)
    opt.step()
    assert not torch.equal(mag, before), "DoRA magnitudes get AdamW"


def test_remove_hooks_detaches_from_the_model():
    model = make_lora_model(seed=13)
    opt = AdaPreLoRA(model, lr=1e-2)
    opt.remove_hooks()
    forward_backward(model, 0)
    assert all(r is None for r in opt._collector.rows)
    with pytest.warns(RuntimeWarning, match="tangent energies"):
        opt.step()
