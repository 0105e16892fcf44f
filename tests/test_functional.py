"""The maths of adaprelora.functional against explicit float64 matrices on random problems."""
import numpy as np
import pytest
import torch

from adaprelora import functional as F

TINY_DAMPING = 1e-12  # the identities hold exactly only as the ridge goes to 0 (spec 3.3)


def _problem(seed, m=7, n=5, r=2, k=1, zero_B=False):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(k, r, n, generator=g, dtype=torch.float64)
    B = torch.zeros(k, m, r, dtype=torch.float64) if zero_B else torch.randn(k, m, r, generator=g, dtype=torch.float64)
    G = torch.randn(k, m, n, generator=g, dtype=torch.float64)
    # feature scales spanning orders of magnitude, like real layers
    p = torch.exp(torch.randn(k, m, generator=g, dtype=torch.float64))
    q = torch.exp(2 * torch.randn(k, n, generator=g, dtype=torch.float64))
    gA, gB = B.mT @ G, G @ A.mT
    return A, B, G, p, q, gA, gB


def _tangent_basis(A, B):
    """Explicit J: vec(dA, dB) -> vec(B dA + dB A), as an (m n) x (r n + m r) matrix."""
    r, n = A.shape
    m = B.shape[0]
    cols = []
    for idx in range(r * n):
        E = np.zeros(r * n)
        E[idx] = 1
        cols.append((B @ E.reshape(r, n)).ravel())
    for idx in range(m * r):
        E = np.zeros(m * r)
        E[idx] = 1
        cols.append((E.reshape(m, r) @ A).ravel())
    return np.stack(cols, 1)


@pytest.mark.parametrize("seed", range(4))
def test_balanced_step_satisfies_normal_equations(seed):
    A, B, G, p, q, gA, gB = _problem(seed)
    dA, dB = F.balanced_solve(A, B, gA, gB, p, q, TINY_DAMPING)
    D = B @ dA + dB @ A
    P, Q = torch.diag_embed(p), torch.diag_embed(q)
    torch.testing.assert_close(B.mT @ P @ D @ Q, gA, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(P @ D @ Q @ A.mT, gB, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("seed", range(3))
def test_weight_step_is_the_H_projection_of_the_adafactor_step(seed):
    """Independent reference: weighted least squares on the explicit Kronecker system."""
    A, B, G, p, q, gA, gB = _problem(seed, m=6, n=4, r=2)
    dA, dB = F.balanced_solve(A, B, gA, gB, p, q, TINY_DAMPING)
    a, b, g = A[0].numpy(), B[0].numpy(), G[0].numpy()
    J = _tangent_basis(a, b)
    W = np.diag(np.outer(p[0].numpy(), q[0].numpy()).ravel())
    target = (g / np.outer(p[0].numpy(), q[0].numpy())).ravel()  # P^-1 G Q^-1: Adafactor's step
    d = np.linalg.pinv(J.T @ W @ J) @ J.T @ W @ target
    D_ref = (J @ d).reshape(6, 4)
    np.testing.assert_allclose((B @ dA + dB @ A)[0].numpy(), D_ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_chosen_element_minimises_the_H_weighted_imbalance(seed):
    m, n, r = 6, 5, 3
    A, B, G, p, q, gA, gB = _problem(seed, m, n, r)
    dA, dB = F.balanced_solve(A, B, gA, gB, p, q, TINY_DAMPING)
    a, b = A[0].numpy(), B[0].numpy()
    w = np.sqrt(np.outer(p[0].numpy(), q[0].numpy()))

    def parts(X):  # the gauge family (dA + X A, dB - B X) realises the same weight step
        return (w * (b @ (dA[0].numpy() + X @ a))).ravel(), (w * ((dB[0].numpy() - b @ X) @ a)).ravel()

    u0, v0 = parts(np.zeros((r, r)))
    cols_u, cols_v = [], []
    for idx in range(r * r):
        E = np.zeros(r * r)
        E[idx] = 1
        u, v = parts(E.reshape(r, r))
        cols_u.append(u - u0)
        cols_v.append(v - v0)
    M = np.concatenate([np.stack(cols_u, 1), np.stack(cols_v, 1)])
    x_best, *_ = np.linalg.lstsq(M, -np.concatenate([u0, v0]), rcond=None)
    assert np.linalg.norm(x_best) < 1e-6 * max(1.0, np.linalg.norm(dA[0].numpy())), "a better-balanced element exists"
    rng = np.random.default_rng(seed)
    base = np.sum(u0 ** 2) + np.sum(v0 ** 2)
    for _ in range(5):
        u, v = parts(1e-3 * rng.standard_normal((r, r)))
        assert np.sum(u ** 2) + np.sum(v ** 2) > base


@pytest.mark.parametrize("seed", range(3))
def test_weight_step_is_invariant_to_factor_gauge(seed):
    A, B, G, p, q, gA, gB = _problem(seed, m=8, n=6, r=3)
    C = torch.randn(1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + seed)) + 3 * torch.eye(3, dtype=torch.float64)
    B2, A2 = B @ C, torch.linalg.solve(C, A)
    gA2, gB2 = B2.mT @ G, G @ A2.mT
    dA, dB = F.balanced_solve(A, B, gA, gB, p, q, TINY_DAMPING)
    dA2, dB2 = F.balanced_solve(A2, B2, gA2, gB2, p, q, TINY_DAMPING)
    torch.testing.assert_close(B2 @ dA2 + dB2 @ A2, B @ dA + dB @ A, rtol=1e-7, atol=1e-9)


def test_zero_B_start_gives_zero_dA_and_no_nan():
    A, B, G, p, q, gA, gB = _problem(0, zero_B=True)
    dA, dB = F.balanced_solve(A.float(), B.float(), gA.float(), gB.float(), p.float(), q.float(), 0.1)
    assert torch.isfinite(dA).all() and torch.isfinite(dB).all()
    assert torch.count_nonzero(dA) == 0
    MA = (A * q[:, None, :]) @ A.mT
    MA = MA + (0.1 * torch.diagonal(MA, dim1=-2, dim2=-1).sum(-1) / A.shape[1])[:, None, None] * torch.eye(A.shape[1], dtype=torch.float64)
    expected = (gB / p[..., None]) @ torch.linalg.inv(MA)
    torch.testing.assert_close(dB.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_tangent_energies_equal_those_of_the_explicit_projection(seed):
    A, B, G, p, q, gA, gB = _problem(seed, m=9, n=7, r=3)
    a, b, g = A[0].numpy(), B[0].numpy(), G[0].numpy()
    PB = b @ np.linalg.inv(b.T @ b) @ b.T
    PA = a.T @ np.linalg.inv(a @ a.T) @ a
    GT = PB @ g + g @ PA - PB @ g @ PA
    row, col = F.tangent_energies(A, B, gA, gB, TINY_DAMPING)
    np.testing.assert_allclose(row[0].numpy(), (GT ** 2).sum(1), rtol=1e-7)
    np.testing.assert_allclose(col[0].numpy(), (GT ** 2).sum(0), rtol=1e-7)


@pytest.mark.parametrize("seed", range(3))
def test_raw_surrogate_energies_equal_those_of_the_explicit_product(seed):
    A, B, G, p, q, gA, gB = _problem(seed, m=9, n=7, r=3, k=2)
    row, col = F.raw_surrogate_energies(A, B, gA, gB)
    for j in range(2):
        S = gB[j].numpy() @ A[j].numpy() + B[j].numpy() @ gA[j].numpy()
        np.testing.assert_allclose(row[j].numpy(), (S ** 2).sum(1), rtol=1e-9)
        np.testing.assert_allclose(col[j].numpy(), (S ** 2).sum(0), rtol=1e-9)


def test_tangent_energies_are_invariant_to_rescaling_factors():
    A, B, G, p, q, gA, gB = _problem(5, m=9, n=7, r=3)
    row, col = F.tangent_energies(A, B, gA, gB, 0.1)
    c = 37.0
    row2, col2 = F.tangent_energies(A / c, B * c, gA * c, gB / c, 0.1)
    torch.testing.assert_close(row2, row, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(col2, col, rtol=1e-6, atol=1e-12)


def test_adafactor_accumulators_follow_the_schedule():
    g = torch.Generator().manual_seed(0)
    m, n = 5, 4
    R, C = torch.zeros(1, m, dtype=torch.float64), torch.zeros(1, n, dtype=torch.float64)
    Rr, Cr = np.zeros(m), np.zeros(n)
    for t in range(1, 5):
        Gt = torch.randn(m, n, generator=g, dtype=torch.float64)
        row, col = (Gt ** 2).sum(1)[None], (Gt ** 2).sum(0)[None]
        R, C, p, q = F.adafactor_accumulators(R, C, row, col, torch.tensor([float(t)]), -0.8, 1e-30)
        beta = 1 - t ** -0.8
        Rr = beta * Rr + (1 - beta) * ((Gt ** 2).numpy().mean(1) + 1e-30)
        Cr = beta * Cr + (1 - beta) * ((Gt ** 2).numpy().mean(0) + 1e-30)
        np.testing.assert_allclose(R[0].numpy(), Rr, rtol=1e-12)
        np.testing.assert_allclose((p[0, :, None] * q[0, None, :]).numpy() ** 2, np.outer(Rr, Cr) / Rr.mean(), rtol=1e-10)
    assert t == 4


@pytest.mark.parametrize("seed", range(3))
def test_delta_norm_from_r_by_r_products(seed):
    A, B, G, p, q, gA, gB = _problem(seed, m=8, n=6, r=3, k=2)
    dA, dB = torch.randn_like(A), torch.randn_like(B)
    explicit = ((B @ dA + dB @ A) ** 2).sum((-2, -1))
    torch.testing.assert_close(F.delta_sq_norm(A, B, dA, dB), explicit, rtol=1e-10, atol=1e-10)
    c = F.clip_factor(A, B, dA, dB, 0.5)
    rms = torch.sqrt(explicit / (8 * 6))
    torch.testing.assert_close(c, torch.clamp(0.5 / rms, max=1.0))


@pytest.mark.parametrize("seed", range(3))
def test_scaled_gradients_match_explicit_inverses(seed):
    A, B, G, p, q, gA, gB = _problem(seed)
    sA, sB = F.scaled_gradients(A, B, gA, gB, 1e-3)
    eye = torch.eye(A.shape[1], dtype=torch.float64)
    torch.testing.assert_close(sA, torch.linalg.inv(B.mT @ B + 1e-3 * eye) @ gA)
    torch.testing.assert_close(sB, gB @ torch.linalg.inv(A @ A.mT + 1e-3 * eye))


@pytest.mark.parametrize("seed", range(3))
def test_lora_pro_equivalent_gradient_is_the_frobenius_projection(seed):
    s = 2.5
    A, B, G, p, q, gA, gB = _problem(seed, m=9, n=7, r=3)
    gradA, gradB = s * gA, s * gB  # what autograd gives for W0 + s B A
    sv = torch.full((1, 1, 1), s, dtype=torch.float64)
    pA, pB = F.lora_pro_gradients(A, B, gradA, gradB, sv, reg=1e-12)
    a, b, g = A[0].numpy(), B[0].numpy(), G[0].numpy()
    PB = b @ np.linalg.inv(b.T @ b) @ b.T
    PA = a.T @ np.linalg.inv(a @ a.T) @ a
    GT = PB @ g + g @ PA - PB @ g @ PA
    np.testing.assert_allclose((s * (B @ pA + pB @ A))[0].numpy(), GT, rtol=1e-7, atol=1e-9)
    # X is the element nearest the plain LoRA gradients: perturbing it only moves further away
    base = ((pA - gradA) ** 2).sum() + ((pB - gradB) ** 2).sum()
    for i in range(4):
        X = 1e-3 * torch.randn(1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        assert ((pA + X @ A - gradA) ** 2).sum() + ((pB - B @ X - gradB) ** 2).sum() > base


def test_adaprelora_with_identity_metric_is_the_balanced_frobenius_projection():
    """Cross-check of spec section 5: with P = Q = I AdaPreLoRA's weight step equals LoRA-Pro's
    equivalent gradient (the Frobenius projection of G), two independent code paths."""
    A, B, G, p, q, gA, gB = _problem(11, m=10, n=8, r=3, k=3)
    ones_m, ones_n = torch.ones_like(p), torch.ones_like(q)
    dA, dB = F.balanced_solve(A, B, gA, gB, ones_m, ones_n, TINY_DAMPING)
    s = torch.full((3, 1, 1), 1.0, dtype=torch.float64)
    pA, pB = F.lora_pro_gradients(A, B, gA, gB, s, reg=1e-12)
    torch.testing.assert_close(B @ dA + dB @ A, B @ pA + pB @ A, rtol=1e-7, atol=1e-9)
    # and the balanced choice: ||B dA|| = ||dB A|| trade-off has the least total among the family
    U, V = F.tangent_factors(A, B, gA, gB, TINY_DAMPING)
    torch.testing.assert_close(U @ V.mT, B @ dA + dB @ A, rtol=1e-7, atol=1e-9)


def test_sym_sylvester_solves_the_equation():
    g = torch.Generator().manual_seed(3)
    X1, X2 = torch.randn(2, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    S1, S2 = X1 @ X1.mT, X2 @ X2.mT
    rhs = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    X = F.sym_sylvester(S1, S2, rhs)
    torch.testing.assert_close(S1 @ X + X @ S2, rhs, rtol=1e-8, atol=1e-8)


def test_adamw_update_matches_torch_adamw():
    torch.manual_seed(0)
    p = torch.randn(3, 4, dtype=torch.float64)
    ref = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    m, v = torch.zeros(1, 3, 4, dtype=torch.float64), torch.zeros(1, 3, 4, dtype=torch.float64)
    cur = p[None].clone()
    for t in range(1, 4):
        grad = torch.randn(3, 4, dtype=torch.float64)
        ref.grad = grad.clone()
        opt.step()
        cur, m, v = F.adamw_update(cur, grad[None], m, v, torch.tensor([float(t)]), lr=0.01, beta1=0.8,
                                   beta2=0.99, eps=1e-6, weight_decay=0.1)
    torch.testing.assert_close(cur[0], ref.detach(), rtol=1e-12, atol=1e-12)
