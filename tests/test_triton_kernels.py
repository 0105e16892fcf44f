"""Triton kernels against the torch reference, in the CPU interpreter (conftest sets TRITON_INTERPRET=1).

Shapes are small (interpreter) and deliberately no multiple of any block size (masks)."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest sets it
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

from adaprelora import functional as F  # noqa: E402
from adaprelora.kernels import reference  # noqa: E402
from adaprelora.kernels.energies import (  # noqa: E402
    _gradient_energies_kernel,
    conv_gradient_energies_triton,
    gradient_energies_triton,
)
from adaprelora.kernels.fused_step import fused_bucket_step  # noqa: E402


def _explicit(x, d):
    G = d.reshape(-1, d.shape[-1]).double().t() @ x.reshape(-1, x.shape[-1]).double()
    return (G * G).sum(1), (G * G).sum(0)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


# %% energy kernel ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("lead,m,n", [((45,), 37, 53), ((3, 7), 70, 33), ((1,), 1, 1), ((2, 50), 16, 100)])
def test_energy_kernel_matches_explicit_gradient(dtype, tol, lead, m, n):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(*lead, n, generator=g).to(dtype)
    d = torch.randn(*lead, m, generator=g).to(dtype)
    row, col = gradient_energies_triton(x, d)
    ref_row, ref_col = _explicit(x, d)  # float64 of the same (rounded) inputs
    assert row.dtype == col.dtype == torch.float32
    assert row.shape == (m,) and col.shape == (n,)
    assert _rel(row, ref_row) < tol and _rel(col, ref_col) < tol


def test_energy_kernel_mixed_and_strided_inputs():
    x = torch.randn(40, 70)[:, ::2]  # non-contiguous (40, 35)
    d = torch.randn(40, 23, dtype=torch.bfloat16)
    row, col = gradient_energies_triton(x, d)
    ref_row, ref_col = _explicit(x.float(), d.float())
    assert _rel(row, ref_row) < 1e-5 and _rel(col, ref_col) < 1e-5


def test_energy_kernel_writes_every_partial_slot():
    """Poisoned partial buffers: every slot the wrapper sums must be written by the kernel."""
    import triton

    T, m, n = 41, 67, 45
    x, d = torch.randn(T, n), torch.randn(T, m)
    cfg = _gradient_energies_kernel.configs[0].kwargs
    row_part = torch.full((triton.cdiv(n, cfg["BLOCK_N"]), m), float("nan"))
    col_part = torch.full((triton.cdiv(m, cfg["BLOCK_M"]), n), float("nan"))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _gradient_energies_kernel[grid](x, d, row_part, col_part, T, n, m, x.stride(0), x.stride(1),
                                    d.stride(0), d.stride(1), row_part.stride(0), col_part.stride(0),
                                    IEEE=True, UPCAST=False)
    ref_row, ref_col = _explicit(x, d)
    assert _rel(row_part.sum(0), ref_row) < 1e-5 and _rel(col_part.sum(0), ref_col) < 1e-5


def test_energy_kernel_agrees_with_reference_module():
    x, d = torch.randn(2, 33, 19), torch.randn(2, 33, 29)
    for a, b in zip(gradient_energies_triton(x, d), reference.gradient_energies(x, d, method="explicit")):
        assert _rel(a, b) < 1e-5


def test_energy_kernel_float64_falls_back_to_reference():
    x, d = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    row, col = gradient_energies_triton(x, d)
    assert row.dtype == torch.float64 and _rel(row, _explicit(x, d)[0]) < 1e-12


def test_energy_kernel_rejects_token_mismatch():
    with pytest.raises(ValueError, match="tokens"):
        gradient_energies_triton(torch.randn(5, 3), torch.randn(6, 4))


@pytest.mark.parametrize("kernel,padding,stride", [(3, 1, 1), (1, 0, 1), (3, 0, 2)])
def test_conv_energies_match_reference(kernel, padding, stride):
    conv = nn.Conv2d(5, 7, kernel, padding=padding, stride=stride)
    x = torch.randn(2, 5, 9, 7)
    d = torch.randn_like(conv(x))
    got = conv_gradient_energies_triton(x, d, conv)
    # explicit conv weight gradient, float64
    w = torch.zeros_like(conv.weight, dtype=torch.float64, requires_grad=True)
    out = torch.nn.functional.conv2d(x.double(), w, None, conv.stride, conv.padding, conv.dilation)
    (gw,) = torch.autograd.grad(out, w, d.double())
    G = gw.reshape(gw.shape[0], -1)
    assert _rel(got[0], (G * G).sum(1)) < 1e-5 and _rel(got[1], (G * G).sum(0)) < 1e-5


# %% fused step -------------------------------------------------------------------------------

def _torch_step(A, B, gradA, gradB, row, col, st, s, lr, variant, mom, wd, clip, damping=0.1):
    """The torch path of the spec, built from adaprelora.functional (the reference)."""
    s3 = s[:, None, None]
    gA, gB = gradA / s3, gradB / s3
    step = st["step"] + 1
    R, C, p, q = F.adafactor_accumulators(st["adafactor_row"], st["adafactor_col"], row, col, step)
    dA, dB = F.balanced_solve(A, B, gA, gB, p, q, damping)
    c = F.clip_factor(A, B, dA, dB, clip)[:, None, None]
    dA, dB = dA * c, dB * c
    st.update(adafactor_row=R, adafactor_col=C, step=step)
    if variant == "adamw":
        kw = dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd)
        A, st["exp_avg_A"], st["exp_avg_sq_A"] = F.adamw_update(A, dA, st["exp_avg_A"], st["exp_avg_sq_A"], step, **kw)
        B, st["exp_avg_B"], st["exp_avg_sq_B"] = F.adamw_update(B, dB, st["exp_avg_B"], st["exp_avg_sq_B"], step, **kw)
        return A, B, c.flatten()
    if mom:
        first = (step <= 1)[:, None, None]
        dA = torch.where(first, dA, mom * st["momentum_buffer_A"] + dA)
        dB = torch.where(first, dB, mom * st["momentum_buffer_B"] + dB)
    A = A * (1 - lr * wd) - (lr / s3) * dA
    B = B * (1 - lr * wd) - (lr / s3) * dB
    cr = F.rebalance(A, B)[:, None, None]
    if mom:
        st["momentum_buffer_A"], st["momentum_buffer_B"] = dA / cr, dB * cr
    return A / cr, B * cr, c.flatten()


def _zero_state(variant, mom, k, m, n, r):
    st = {"step": torch.zeros(k), "adafactor_row": torch.zeros(k, m), "adafactor_col": torch.zeros(k, n)}
    if variant == "adamw":
        st.update(exp_avg_A=torch.zeros(k, r, n), exp_avg_sq_A=torch.zeros(k, r, n),
                  exp_avg_B=torch.zeros(k, m, r), exp_avg_sq_B=torch.zeros(k, m, r))
    elif mom:
        st.update(momentum_buffer_A=torch.zeros(k, r, n), momentum_buffer_B=torch.zeros(k, m, r))
    return st


@pytest.mark.parametrize("variant,mom,clip", [("adamw", 0.0, 1.0), ("adamw", 0.0, 0.05), ("sgd", 0.0, None),
                                              ("sgd", 0.9, 0.05)])
def test_fused_step_matches_torch_path(variant, mom, clip):
    torch.manual_seed(0)
    k, m, n, r = 3, 37, 45, 4
    s = torch.tensor([2.0, 0.5, 1.0])
    A0 = torch.randn(k, r, n) * 0.1
    B0 = torch.zeros(k, m, r)  # the usual LoRA start
    A_ref, B_ref = A0.clone(), B0.clone()
    A_tri, B_tri = [a.clone() for a in A0], [b.clone() for b in B0]
    st_ref, st_tri = _zero_state(variant, mom, k, m, n, r), _zero_state(variant, mom, k, m, n, r)
    clipped = 0
    for _ in range(4):
        G = torch.randn(k, m, n)
        gradA, gradB = s[:, None, None] * (B_ref.mT @ G), s[:, None, None] * (G @ A_ref.mT)
        row, col = (G * G).sum(2), (G * G).sum(1)
        A_ref, B_ref, c = _torch_step(A_ref, B_ref, gradA, gradB, row, col, st_ref, s, 1e-2, variant, mom, 0.01, clip)
        clipped += int((c < 1).sum())
        ok = fused_bucket_step(A_tri, B_tri, list(gradA), list(gradB), row, list(col), st_tri, s,
                               torch.tensor(1e-2), variant=variant, momentum=mom, weight_decay=0.01,
                               clip_threshold=clip)
        assert ok.all()
        for j in range(k):
            assert _rel(A_tri[j], A_ref[j]) < 1e-5
            assert _rel(B_tri[j], B_ref[j]) < 1e-5
        for name, value in st_ref.items():
            assert _rel(st_tri[name], value) < 1e-5, name
    if clip is not None and clip < 1:
        assert clipped > 0  # the clipping branch was exercised


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the NaN
def test_fused_step_skips_nonfinite_pair():
    torch.manual_seed(1)
    k, m, n, r = 2, 21, 19, 3
    s = torch.ones(k)
    A = [torch.randn(r, n) for _ in range(k)]
    B = [torch.randn(m, r) for _ in range(k)]
    A0, B0 = [a.clone() for a in A], [b.clone() for b in B]
    gradA, gradB = [torch.randn(r, n) for _ in range(k)], [torch.randn(m, r) for _ in range(k)]
    gradA[1][0, 3] = float("nan")
    st = _zero_state("adamw", 0, k, m, n, r)
    ok = fused_bucket_step(A, B, gradA, gradB, torch.rand(k, m), torch.rand(k, n), st, s, 1e-2)
    assert ok.tolist() == [True, False]
    assert torch.equal(A[1], A0[1]) and torch.equal(B[1], B0[1])
    assert not torch.equal(B[0], B0[0])
    assert st["step"].tolist() == [1.0, 0.0]
    assert torch.all(st["adafactor_row"][1] == 0) and torch.all(st["exp_avg_A"][1] == 0)
    assert all(torch.isfinite(t).all() for t in st.values())


def test_fused_step_bfloat16_factors():
    torch.manual_seed(2)
    k, m, n, r = 2, 33, 18, 16
    s = torch.full((k,), 2.0)
    A0, B0 = torch.randn(k, r, n) * 0.1, torch.randn(k, m, r) * 0.1
    A = [a.to(torch.bfloat16) for a in A0]
    B = [b.to(torch.bfloat16) for b in B0]
    G = torch.randn(k, m, n)
    gradA = (s[:, None, None] * (B0.mT @ G)).to(torch.bfloat16)
    gradB = (s[:, None, None] * (G @ A0.mT)).to(torch.bfloat16)
    row, col = (G * G).sum(2), (G * G).sum(1)
    st_ref, st_tri = _zero_state("adamw", 0, k, m, n, r), _zero_state("adamw", 0, k, m, n, r)
    A_ref, B_ref, _ = _torch_step(torch.stack(A).float(), torch.stack(B).float(), gradA.float(), gradB.float(),
                                  row, col, st_ref, s, 1e-3, "adamw", 0, 0.0, 1.0)
    fused_bucket_step(A, B, list(gradA), list(gradB), row, col, st_tri, s, 1e-3)
    for j in range(k):
        assert A[j].dtype == torch.bfloat16
        assert _rel(A[j], A_ref[j]) < 1e-2 and _rel(B[j], B_ref[j]) < 1e-2


# %% the optimizer, backend="triton" vs "torch" ---------------------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(21, 35)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.fc2 = nn.Linear(35 + 5 * 4 * 4, 13)

    def forward(self, x, img):
        h = torch.tanh(self.fc1(x))
        c = torch.tanh(self.conv(img)).flatten(1)
        return self.fc2(torch.cat([h, c], dim=1))


def _lora_net(seed):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "conv", "fc2"])
    return peft.get_peft_model(_Net(), cfg)


@pytest.mark.parametrize("variant", ["adamw", "sgd"])
@pytest.mark.parametrize("stats", ["exact", "tangent"])
def test_optimizer_triton_backend_equals_torch(variant, stats):
    from adaprelora.optimizer import AdaPreLoRA

    results = {}
    for backend in ("torch", "triton"):
        net = _lora_net(0)
        kw = dict(momentum=0.5) if variant == "sgd" else {}
        if stats == "tangent":
            from adaprelora.pairs import find_lora_pairs

            pairs = [(p.A, p.B, p.scaling()) for p in find_lora_pairs(net)]
            opt = AdaPreLoRA([p for p in net.parameters() if p.requires_grad], lr=1e-2, variant=variant,
                             stats="tangent", backend=backend, pairs=pairs, **kw)
        else:
            opt = AdaPreLoRA(net, lr=1e-2, variant=variant, stats="exact", backend=backend, **kw)
        assert opt.backend == backend
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            x, img = torch.randn(6, 21, generator=g), torch.randn(6, 3, 4, 4, generator=g)
            loss = net(x, img).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        results[backend] = {k: v.detach().clone() for k, v in net.named_parameters() if v.requires_grad}
    for name, ref in results["torch"].items():
        assert _rel(results["triton"][name], ref) < 1e-4, name


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch\n"
        "from adaprelora.kernels import resolve_backend\n"
        "try:\n"
        "    resolve_backend('triton', torch.device('cpu'))\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("ERR"), out.stdout + out.stderr
    assert "CUDA" in out.stdout and "TRITON_INTERPRET=1" in out.stdout
