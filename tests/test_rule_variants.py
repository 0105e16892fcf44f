"""The rule's options (docs/algorithm.md 3.5, "Options of the rule"): momentum into the solve with
Adafactor's relative step size and update clipping, the energies' EMA before or after the square
root, and the scale of the sgd step (Adafactor's factored V = R C^T / sum(R)), each against an
explicit float64 reference; the fused path's fallback; the options through `--optimizer_args`."""
import numpy as np
import pytest
import torch
from torch import nn

from adaprelora import AdaPreLoRA
from adaprelora import functional as F


def _inv_ridge(M, damping):
    r = M.shape[0]
    return np.linalg.inv(M + (damping * np.trace(M) / r + np.finfo(np.float32).tiny) * np.eye(r))


def _reference_step(st, A, B, G, s, *, lr, variant="sgd", ema=False, rel=False, rel_eps=1e-3, energy_ema="squared",
                    clip=1.0, damping=0.1, wd=0.0, betas=(0.9, 0.999), decay=-0.8, eps=1e-8):
    """One AdaPreLoRA step of one pair with explicit m x n matrices (tangent energies)."""
    m, r = B.shape
    n = A.shape[1]
    gA, gB = B.T @ G, G @ A.T
    PB = B @ _inv_ridge(B.T @ B, damping) @ B.T
    PA = A.T @ _inv_ridge(A @ A.T, damping) @ A
    E = (PB @ G + G @ PA - PB @ G @ PA) ** 2
    t = st["t"] = st.get("t", 0) + 1
    if ema:
        st["eA"] = betas[0] * st.get("eA", 0) + (1 - betas[0]) * gA
        st["eB"] = betas[0] * st.get("eB", 0) + (1 - betas[0]) * gB
        gA, gB = st["eA"] / (1 - betas[0] ** t), st["eB"] / (1 - betas[0] ** t)
    beta2 = 1 - t ** decay
    row, col = E.sum(1) / n + 1e-30, E.sum(0) / m + 1e-30
    if energy_ema == "root":
        st["R"] = beta2 * st.get("R", 0) + (1 - beta2) * np.sqrt(row)
        st["C"] = beta2 * st.get("C", 0) + (1 - beta2) * np.sqrt(col)
        p, q = st["R"] / np.sqrt(np.mean(st["R"] ** 2)), st["C"]
    else:
        st["R"] = beta2 * st.get("R", 0) + (1 - beta2) * row
        st["C"] = beta2 * st.get("C", 0) + (1 - beta2) * col
        p, q = np.sqrt(st["R"] / st["R"].mean()), np.sqrt(st["C"])
    P, Q = np.diag(p), np.diag(q)
    MBi, MAi = _inv_ridge(B.T @ P @ B, damping), _inv_ridge(A @ Q @ A.T, damping)
    K = gA @ A.T
    dA = MBi @ (gA @ np.linalg.inv(Q) - 0.5 * K @ MAi @ A)
    dB = (np.linalg.inv(P) @ gB - 0.5 * B @ MBi @ K) @ MAi
    rms = np.sqrt(((B @ dA + dB @ A) ** 2).mean())
    if clip is not None and rms > clip:
        dA, dB = dA * clip / rms, dB * clip / rms
    if variant == "adamw":
        out = []
        for name, x, d in (("A", A, dA), ("B", B, dB)):
            mo = st[name + "m"] = betas[0] * st.get(name + "m", 0) + (1 - betas[0]) * d
            v = st[name + "v"] = betas[1] * st.get(name + "v", 0) + (1 - betas[1]) * d * d
            out.append(x * (1 - lr * wd) - lr * (mo / (1 - betas[0] ** t)) / (np.sqrt(v / (1 - betas[1] ** t)) + eps))
        return out
    if rel:
        lr = lr * max(rel_eps, np.sqrt(((s * B @ A) ** 2).mean()))
    A2, B2 = A * (1 - lr * wd) - lr / s * dA, B * (1 - lr * wd) - lr / s * dB
    c = np.sqrt(np.linalg.norm(A2) / np.linalg.norm(B2))
    if ema:
        st["eA"], st["eB"] = st["eA"] * c, st["eB"] / c
    return A2 / c, B2 * c


CASES = {
    # (a) momentum into the solve, Adafactor's relative step size and update clipping
    "ema+relative": dict(variant="sgd", ema=True, rel=True, lr=0.5),
    "ema+relative+noclip+wd": dict(variant="sgd", ema=True, rel=True, lr=0.5, clip=None, wd=0.05),
    "ema+relative+clip": dict(variant="sgd", ema=True, rel=True, lr=0.5, clip=0.05, rel_eps=0.3),
    # (c) the energies averaged after the square root
    "root-sgd": dict(variant="sgd", energy_ema="root", lr=0.02),
    "root-adamw": dict(variant="adamw", energy_ema="root", lr=0.05),
    "all-three": dict(variant="sgd", ema=True, rel=True, energy_ema="root", lr=0.5),
}


def _options(case):
    return dict(variant=case["variant"], momentum_before_solve=case.get("ema", False),
                relative_step=case.get("rel", False), relative_step_eps=case.get("rel_eps", 1e-3),
                energy_ema=case.get("energy_ema", "squared"), clip_threshold=case.get("clip", 1.0),
                weight_decay=case.get("wd", 0.0))


def _gradients(rng, m, n, steps):
    return [rng.standard_normal((m, n)) * np.exp(rng.standard_normal(n)) for _ in range(steps)]


@pytest.mark.parametrize("name", list(CASES))
def test_options_match_the_explicit_float64_reference(name):
    case = CASES[name]
    rng = np.random.default_rng(7)
    m, n, r, s = 8, 6, 2, 0.7
    A0, B0 = rng.standard_normal((r, n)), rng.standard_normal((m, r))
    Gs = _gradients(rng, m, n, 6)
    A, B = nn.Parameter(torch.tensor(A0)), nn.Parameter(torch.tensor(B0))
    opt = AdaPreLoRA([A, B], lr=case["lr"], stats="tangent", pairs=[(A, B, s)], **_options(case))
    ref = {k: v for k, v in case.items() if k != "variant"}
    st, Ar, Br = {}, A0, B0
    for step, G in enumerate(Gs):
        A.grad, B.grad = torch.tensor(s * B.detach().numpy().T @ G), torch.tensor(s * G @ A.detach().numpy().T)
        opt.step()
        Ar, Br = _reference_step(st, Ar, Br, G, s, variant=case["variant"], **ref)
        np.testing.assert_allclose(A.detach().numpy(), Ar, rtol=1e-8, atol=1e-10, err_msg=f"A at step {step}")
        np.testing.assert_allclose(B.detach().numpy(), Br, rtol=1e-8, atol=1e-10, err_msg=f"B at step {step}")
    # the options change the trajectory, so the reference could tell a missing option
    st0, Ad, Bd = {}, A0, B0
    for G in Gs:
        Ad, Bd = _reference_step(st0, Ad, Bd, G, s, variant=case["variant"], lr=case["lr"],
                                 clip=case.get("clip", 1.0), wd=case.get("wd", 0.0))
    assert not np.allclose(Bd @ Ad, Br @ Ar, rtol=1e-3), "the option did not change the weight trajectory"


def test_the_sgd_step_has_adafactors_scale_and_relative_step():
    """(b) At full rank (B square and invertible, so every G is in the tangent space) the solve's
    weight step B dA + dB A is Adafactor's clipped update G / sqrt(V), V = R C^T / sum(R) with R, C
    the EMAs of row and column sums of G^2, and the relative step scales it as Adafactor's
    `scale_parameter` does: checked step by step against transformers' Adafactor on W = s B A."""
    from transformers.optimization import Adafactor

    rng = np.random.default_rng(11)
    m, n, s, lr = 4, 6, 1.3, 0.05
    A = torch.tensor(rng.standard_normal((m, n)))
    B = torch.tensor(rng.standard_normal((m, m)) + 3 * np.eye(m)) * 1e-3  # RMS(s B A) near eps2: both branches
    W = nn.Parameter(s * B @ A)
    ada = Adafactor([W], lr=lr, relative_step=False, scale_parameter=True, warmup_init=False, clip_threshold=1.0)
    R, C = torch.zeros(1, m, dtype=torch.float64), torch.zeros(1, n, dtype=torch.float64)
    Rsum, Csum, clipped = np.zeros(m), np.zeros(n), 0
    for t, G in enumerate(_gradients(rng, m, n, 6), start=1):
        G = torch.tensor(G) * (10.0 if t % 2 else 1.0)  # some steps clip, some do not
        B = B * 1.7  # the adapter grows: RMS(s B A) crosses eps2
        W.data.copy_(s * B @ A)
        W.grad = G.clone()
        before = W.detach().clone()
        ada.step()
        ada_step = before - W.detach()
        R, C, p, q = F.adafactor_accumulators(R, C, (G ** 2).sum(1)[None], (G ** 2).sum(0)[None], torch.tensor([t]))
        beta2 = 1 - t ** -0.8
        Rsum = beta2 * Rsum + (1 - beta2) * ((G ** 2).sum(1).numpy() + n * 1e-30)
        Csum = beta2 * Csum + (1 - beta2) * ((G ** 2).sum(0).numpy() + m * 1e-30)
        np.testing.assert_allclose((p[0, :, None] * q[0, None, :]).numpy(),
                                   np.sqrt(np.outer(Rsum, Csum) / Rsum.sum()), rtol=1e-12)
        XA = torch.cat([A, s * B.T @ G])[None]
        XB = torch.stack([B, s * G @ A.T])[None]
        inv_s = torch.full((1, 1, 1), 1 / s, dtype=torch.float64)
        dA, dB = F.balanced_step_(XA.clone(), XB.clone(), p, q, inv_s, damping=1e-12, clip_threshold=1.0)
        delta = B @ dA[0] + dB[0] @ A
        clipped += bool(torch.sqrt((delta ** 2).mean()) > 1 - 1e-9)
        rho = F.relative_step_scale(A[None], B[None], inv_s, 1e-3)
        torch.testing.assert_close(lr * rho[0] * delta, ada_step, rtol=1e-7, atol=1e-12)
    assert 0 < clipped < 6, "the comparison should see clipped and unclipped steps"


def test_only_the_product_p_q_matters():
    """Adafactor's V = R C^T / sum(R) fixes p_i q_j only; any split (p c, q / c) gives the same step,
    so the normalisation of p and q cannot change the rule's scale."""
    g = torch.Generator().manual_seed(5)
    k, m, n, r = 2, 7, 5, 3
    XA = torch.randn(k, 2 * r, n, generator=g, dtype=torch.float64)
    XB = torch.randn(k, 2, m, r, generator=g, dtype=torch.float64)
    p, q = torch.rand(k, m, generator=g, dtype=torch.float64) + 0.1, torch.rand(k, n, generator=g, dtype=torch.float64) + 0.1
    inv_s = torch.full((k, 1, 1), 0.5, dtype=torch.float64)
    dA, dB = F.balanced_step_(XA.clone(), XB.clone(), p, q, inv_s)
    dA2, dB2 = F.balanced_step_(XA.clone(), XB.clone(), p * 37.0, q / 37.0, inv_s)
    torch.testing.assert_close(dA2, dA, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dB2, dB, rtol=1e-10, atol=1e-12)
    dA3, _ = F.balanced_step_(XA.clone(), XB.clone(), p * 37.0, q, inv_s)
    assert not torch.allclose(dA3, dA, rtol=1e-3), "a change of the product must change the step"


def _twins(seed=0, **kw):
    """Two identical single-layer pairs (float32) and their optimizers."""
    torch.manual_seed(seed)
    pairs = []
    for _ in range(2):
        torch.manual_seed(seed)
        A, B = nn.Parameter(torch.randn(3, 10)), nn.Parameter(torch.randn(12, 3) * 0.1)
        pairs.append((A, B, AdaPreLoRA([A, B], lr=0.3, stats="tangent", pairs=[(A, B, 1.0)], **kw)))
    return pairs


@pytest.mark.parametrize("kw", [dict(variant="sgd", momentum_before_solve=True), dict(variant="sgd", relative_step=True),
                                dict(energy_ema="root")])
def test_options_the_fused_step_lacks_fall_back_to_the_torch_path(kw):
    """With backend 'triton' a variant the fused kernels do not implement runs the torch path
    (on CPU the fused kernels could not run at all): same result as backend 'torch'."""
    (A1, B1, o1), (A2, B2, o2) = _twins(**kw)
    o2.backend = "triton"
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        G = torch.randn(12, 10, generator=g)
        for A, B, o in ((A1, B1, o1), (A2, B2, o2)):
            A.grad, B.grad = (B.detach().T @ G), (G @ A.detach().T)
            o.step()
    torch.testing.assert_close(A1, A2, rtol=0, atol=0)
    torch.testing.assert_close(B1, B2, rtol=0, atol=0)


def test_options_are_validated_and_reachable_through_optimizer_args():
    from adaprelora.training.errors import UserError
    from adaprelora.training.options import check_optimizer_args

    A, B = nn.Parameter(torch.randn(2, 5)), nn.Parameter(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="relative_step needs variant='sgd'"):
        AdaPreLoRA([A, B], pairs=[(A, B, 1.0)], relative_step=True)
    with pytest.raises(ValueError, match="energy_ema must be one of"):
        AdaPreLoRA([A, B], pairs=[(A, B, 1.0)], energy_ema="sqrt")
    with pytest.raises(ValueError, match="relative_step_eps"):
        AdaPreLoRA([A, B], pairs=[(A, B, 1.0)], variant="sgd", relative_step=True, relative_step_eps=0.0)
    for name in ("adaprelora", "adaprelora-sgd"):
        check_optimizer_args(name, {"momentum_before_solve": True, "relative_step": True,
                                    "relative_step_eps": 1e-2, "energy_ema": "root"})
    with pytest.raises(UserError, match="relative_step.*True or False"):
        check_optimizer_args("adaprelora-sgd", {"relative_step": 1})
    with pytest.raises(UserError, match="energy_ema.*text"):
        check_optimizer_args("adaprelora-sgd", {"energy_ema": 2})
