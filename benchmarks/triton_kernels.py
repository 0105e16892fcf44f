"""Benchmark of the Triton kernels (docs/triton.md): energies, the fused bucket step, a UNet LoRA step.

    python benchmarks/triton_kernels.py [--out benchmarks/results/triton_kernels.json] [--skip-unet]
    python benchmarks/triton_kernels.py --interpret-smoke     # CPU, tiny shapes, Triton interpreter

On a CUDA GPU it measures, with triton.testing.do_bench (median, ms):
  1. energies: fused kernel vs materialise-then-reduce in torch (G = D^T X; G*G; two sums), at SD 1.5
     attention shapes (tokens 4096 x batch) and Llama-7B shapes (tokens 4096), as time, TFLOPS
     (2 T m n / t) and fraction of the measured bf16 matmul rate (a large square bf16 GEMM);
  2. step for the SD 1.5 attention LoRA set (r = 16, 128 pairs): the fused Triton bucket step vs
     the same torch maths eager vs torch.compile vs torch.optim.AdamW(fused=True);
  3. a whole SD 1.5-shaped UNet LoRA training step (random weights, 512 px, batch 1, bf16):
     AdaPreLoRA (stats="exact", backend="auto") vs AdamW(fused=True).
It prints a table and writes JSON. Without a GPU it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/triton_kernels.json")
    ap.add_argument("--interpret-smoke", action="store_true",
                    help="run tiny shapes on CPU under TRITON_INTERPRET=1 (CI smoke; timings meaningless)")
    ap.add_argument("--skip-unet", action="store_true", help="skip the whole-UNet training step")
    ap.add_argument("--batches", default="1,2", help="SD batch sizes for the energy shapes")
    return ap.parse_args()


ARGS = _args()
if ARGS.interpret_smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402 - after TRITON_INTERPRET is set

SMOKE = ARGS.interpret_smoke
DEVICE = "cpu" if SMOKE else "cuda"


def bench(fn, warmup=25, rep=100):
    """Median milliseconds: triton.testing.do_bench on the GPU, a perf_counter loop in the smoke run."""
    if SMOKE:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


# %% 1. energies -----------------------------------------------------------------------------

def torch_materialise(x, d):
    G = d.t().float() @ x.float() if x.dtype == torch.float32 else (d.t() @ x).float()  # T m n MACs, write m n
    G2 = G * G  # read m n, write m n
    return G2.sum(1), G2.sum(0)  # read m n twice


def energy_shapes():
    shapes = []
    if SMOKE:
        return [("tiny", 45, 37, 53), ("tiny-odd", 70, 33, 21)]
    for b in [int(v) for v in ARGS.batches.split(",")]:
        for w in (320, 640, 1280):
            shapes.append((f"SD1.5 self-attn w{w} b{b}", 4096 * b, w, w))
            shapes.append((f"SD1.5 cross-attn k/v w{w} b{b}", 77 * b, w, 768))
    shapes += [("Llama-7B q/k/v/o 4096x4096", 4096, 4096, 4096),
               ("Llama-7B gate/up 11008x4096", 4096, 11008, 4096),
               ("Llama-7B down 4096x11008", 4096, 4096, 11008)]
    return shapes


def bench_energies(peak_tflops):
    from adaprelora.kernels.energies import gradient_energies_triton

    rows = []
    dtype = torch.float32 if SMOKE else torch.bfloat16
    for name, T, m, n in energy_shapes():
        x = torch.randn(T, n, device=DEVICE, dtype=dtype)
        d = torch.randn(T, m, device=DEVICE, dtype=dtype)
        r1, c1 = gradient_energies_triton(x, d)
        r2, c2 = torch_materialise(x, d)
        err = max(((r1 - r2).abs().max() / r2.abs().max()).item(), ((c1 - c2).abs().max() / c2.abs().max()).item())
        t_tri = bench(lambda: gradient_energies_triton(x, d))
        t_torch = bench(lambda: torch_materialise(x, d))
        t_mm = bench(lambda: d.t() @ x)
        flops = 2.0 * T * m * n
        tf = flops / t_tri / 1e9
        rows.append(dict(shape=name, tokens=T, m=m, n=n, dtype=str(dtype), triton_ms=t_tri, torch_ms=t_torch,
                         matmul_ms=t_mm, triton_tflops=tf, speedup_vs_torch=t_torch / t_tri,
                         frac_of_same_shape_matmul=t_mm / t_tri,
                         frac_of_peak_matmul=(tf / peak_tflops) if peak_tflops else None, max_rel_err=err))
    return rows


def measured_matmul_tflops():
    if SMOKE:
        return None
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    return 2 * 8192**3 / bench(lambda: a @ b) / 1e9


# %% 2. the optimizer step on the SD 1.5 attention LoRA set ---------------------------------

def sd15_attention_pairs(r=16, dtype=torch.float32):
    """(m, n) of the 128 attention projections of SD 1.5 (q, k, v, out of self- and cross-attention)."""
    if SMOKE:
        return [(40, 24), (40, 24), (24, 40), (33, 17)], 4
    shapes = []
    for width, blocks in ((320, 5), (640, 5), (1280, 6)):  # down 2/2/2, mid 1, up 3/3/3 transformer blocks
        for _ in range(blocks):
            shapes += [(width, width)] * 4  # attn1 q, k, v, out
            shapes += [(width, width), (width, 768), (width, 768), (width, width)]  # attn2 q, k, v, out
    assert len(shapes) == 128
    return shapes, r


def make_pairs(shapes, r, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    pairs = []
    for m, n in shapes:
        A = (torch.randn(r, n, device=DEVICE, generator=g) * 0.02).to(dtype)
        B = (torch.randn(m, r, device=DEVICE, generator=g) * 0.02).to(dtype)
        gA = torch.randn(r, n, device=DEVICE, generator=g).to(dtype) * 1e-3
        gB = torch.randn(m, r, device=DEVICE, generator=g).to(dtype) * 1e-3
        row = torch.rand(m, device=DEVICE, generator=g)
        col = torch.rand(n, device=DEVICE, generator=g)
        pairs.append((A, B, gA, gB, row, col))
    return pairs


def buckets_of(pairs):
    out = {}
    for i, (A, B, *_rest) in enumerate(pairs):
        out.setdefault((tuple(A.shape), tuple(B.shape)), []).append(i)
    return list(out.values())


def new_state(k, m, n, r):
    z = lambda *s: torch.zeros(*s, device=DEVICE)  # noqa: E731
    return {"step": z(k), "adafactor_row": z(k, m), "adafactor_col": z(k, n), "exp_avg_A": z(k, r, n),
            "exp_avg_sq_A": z(k, r, n), "exp_avg_B": z(k, m, r), "exp_avg_sq_B": z(k, m, r)}


def torch_bucket_step(A_l, B_l, gA_l, gB_l, row, col, st, s, lr):
    """The torch path's maths for one bucket (stack, functional ops, write back), as in base.py."""
    from adaprelora import functional as F

    A, B = torch.stack(A_l).float(), torch.stack(B_l).float()
    gA, gB = torch.stack(gA_l).float() / s, torch.stack(gB_l).float() / s
    step = st["step"] + 1
    R, C, p, q = F.adafactor_accumulators(st["adafactor_row"], st["adafactor_col"], torch.stack(row),
                                          torch.stack(col), step)
    dA, dB = F.balanced_solve(A, B, gA, gB, p, q, 0.1)
    c = F.clip_factor(A, B, dA, dB, 1.0)[:, None, None]
    kw = dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    A2, mA, vA = F.adamw_update(A, dA * c, st["exp_avg_A"], st["exp_avg_sq_A"], step, **kw)
    B2, mB, vB = F.adamw_update(B, dB * c, st["exp_avg_B"], st["exp_avg_sq_B"], step, **kw)
    for name, v in (("adafactor_row", R), ("adafactor_col", C), ("step", step), ("exp_avg_A", mA),
                    ("exp_avg_sq_A", vA), ("exp_avg_B", mB), ("exp_avg_sq_B", vB)):
        st[name].copy_(v)
    torch._foreach_copy_(list(A_l) + list(B_l), list(A2.to(A_l[0].dtype).unbind(0)) + list(B2.to(B_l[0].dtype).unbind(0)))


def bench_step(param_dtype):
    from adaprelora.kernels.fused_step import fused_bucket_step

    shapes, r = sd15_attention_pairs()
    pairs = make_pairs(shapes, r, param_dtype)
    buckets = buckets_of(pairs)
    lr = torch.tensor(1e-4, device=DEVICE)
    states = [new_state(len(ids), pairs[ids[0]][1].shape[0], pairs[ids[0]][0].shape[1], r) for ids in buckets]
    scales = [torch.ones(len(ids), device=DEVICE) for ids in buckets]

    def cols(ids, j):
        return [pairs[i][j] for i in ids]

    def triton_step():
        for ids, st, s in zip(buckets, states, scales):
            fused_bucket_step(cols(ids, 0), cols(ids, 1), cols(ids, 2), cols(ids, 3), cols(ids, 4), cols(ids, 5),
                              st, s, lr)

    def eager_step(fn=torch_bucket_step):
        for ids, st, s in zip(buckets, states, scales):
            fn(cols(ids, 0), cols(ids, 1), cols(ids, 2), cols(ids, 3), cols(ids, 4), cols(ids, 5), st,
               s[:, None, None], 1e-4)

    results = {"pairs": len(pairs), "buckets": len(buckets), "rank": r, "param_dtype": str(param_dtype)}
    results["triton_fused_ms"] = bench(triton_step)
    results["torch_eager_ms"] = bench(eager_step)
    if not SMOKE:
        compiled = torch.compile(torch_bucket_step)
        try:
            eager_step(compiled)  # compile outside the timing
            results["torch_compile_ms"] = bench(lambda: eager_step(compiled))
        except Exception as err:  # noqa: BLE001 - report, do not die
            results["torch_compile_ms"] = None
            results["torch_compile_error"] = repr(err)[:300]
    params = [t for p in pairs for t in p[:2]]
    for t, g in zip(params, [g for p in pairs for g in p[2:4]]):
        t.grad = g
    adamw = torch.optim.AdamW(params, lr=1e-4, fused=not SMOKE)
    adamw.step()
    results["adamw_fused_ms" if not SMOKE else "adamw_ms"] = bench(adamw.step)
    base = results.get("adamw_fused_ms") or results.get("adamw_ms")
    results["triton_vs_adamw"] = results["triton_fused_ms"] / base
    results["eager_vs_triton"] = results["torch_eager_ms"] / results["triton_fused_ms"]
    return results


# %% 3. whole UNet LoRA step ----------------------------------------------------------------

SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def bench_unet():
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    from adaprelora.optimizer import AdaPreLoRA

    out = {}
    for name in ("adamw_fused", "adaprelora"):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).to(DEVICE, torch.bfloat16)
        unet.requires_grad_(False)
        unet = get_peft_model(unet, LoraConfig(r=16, lora_alpha=16,
                                               target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        params = [p for p in unet.parameters() if p.requires_grad]
        if name == "adamw_fused":
            opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        else:
            opt = AdaPreLoRA(unet, lr=1e-4)
        latents = torch.randn(1, 4, 64, 64, device=DEVICE, dtype=torch.bfloat16)
        text = torch.randn(1, 77, 768, device=DEVICE, dtype=torch.bfloat16)
        t = torch.tensor([500], device=DEVICE)
        target = torch.randn_like(latents)

        def train_step(unet=unet, opt=opt):  # bound now: both are deleted before the next model
            pred = unet(latents, t, encoder_hidden_states=text).sample
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        out[f"{name}_ms"] = bench(train_step, warmup=5, rep=30)
        out[f"{name}_pairs"] = len(params) // 2
        if name == "adaprelora":
            out["adaprelora_backend"] = opt.backend
        del unet, opt, train_step
        torch.cuda.empty_cache()
    out["adaprelora_overhead"] = out["adaprelora_ms"] / out["adamw_fused_ms"] - 1
    return out


# %% main -----------------------------------------------------------------------------------

def _table(rows, cols):
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def main():
    if not SMOKE and not torch.cuda.is_available():
        print("benchmarks/triton_kernels.py needs a CUDA GPU (none found); nothing measured. "
              "Use --interpret-smoke for a CPU smoke run of the kernels under the Triton interpreter.")
        return 0
    import triton

    meta = {"device": torch.cuda.get_device_name() if not SMOKE else "cpu (TRITON_INTERPRET=1 smoke)",
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "smoke": SMOKE, "timing": "triton.testing.do_bench median, ms" if not SMOKE else "one call, ms"}
    peak = measured_matmul_tflops()
    meta["measured_bf16_matmul_tflops"] = peak
    print(f"device: {meta['device']}   measured bf16 matmul: {_fmt(peak)} TFLOPS")

    energies = bench_energies(peak)
    print("\n== gradient energies: fused Triton kernel vs materialise-then-reduce ==")
    _table(energies, ["shape", "tokens", "m", "n", "triton_ms", "torch_ms", "speedup_vs_torch", "triton_tflops",
                      "frac_of_peak_matmul", "frac_of_same_shape_matmul", "max_rel_err"])

    steps = [bench_step(torch.float32)] + ([] if SMOKE else [bench_step(torch.bfloat16)])
    print("\n== optimizer step, SD 1.5 attention LoRA set (r=16) ==")
    _table(steps, ["param_dtype", "pairs", "buckets", "triton_fused_ms", "torch_eager_ms", "torch_compile_ms",
                   "adamw_fused_ms", "adamw_ms", "triton_vs_adamw", "eager_vs_triton"])

    unet = None
    if not SMOKE and not ARGS.skip_unet:
        unet = bench_unet()
        print("\n== whole SD 1.5-shaped UNet LoRA step (512 px, batch 1, bf16) ==")
        _table([unet], list(unet))

    os.makedirs(os.path.dirname(os.path.abspath(ARGS.out)), exist_ok=True)
    with open(ARGS.out, "w") as fh:
        json.dump({"meta": meta, "energies": energies, "step": steps, "unet": unet}, fh, indent=2)
    print(f"\nwrote {ARGS.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
