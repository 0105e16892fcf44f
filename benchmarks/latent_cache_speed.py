"""What `--cache_latents` saves per DreamBooth training step: steps/s with and without the cache, and
peak memory, for the tiny SD and SDXL pipelines and for the tiny SD UNet behind an SD-1.5-shaped VAE
(random weights, real shapes) at a real image size. Prints a table, writes JSON.

    python benchmarks/latent_cache_speed.py [--steps 12] [--big-resolution 512] [--threads 1]

Each configuration runs `train()` in its own subprocess (so peak memory is that run's), one thread,
batch 1, unet-only LoRA; the steps/s is taken after the first step (warm-up and, when caching, the
encoding are excluded; the caching time is reported on its own). On a CPU the VAE cannot leave the
device, so the memory column shows the process's peak RSS, which caching does not lower; on a GPU
the VAE (and its activations) leave device memory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "results", "latent_cache_speed.json")


def _build(kind: str, folder: str) -> str:
    """Save the pipeline a configuration trains on; returns its folder."""
    path = os.path.join(folder, kind)
    if kind == "tiny-sdxl":
        from adaprelora.testing.tiny_sdxl import build_tiny_sdxl_pipeline

        build_tiny_sdxl_pipeline(path)
    else:
        from adaprelora.testing.tiny_sd import build_tiny_sd_pipeline

        pipe = build_tiny_sd_pipeline(None)
        if kind == "sd15-vae":
            from diffusers import AutoencoderKL

            # Stable Diffusion 1.5's VAE architecture (83.7M parameters), random weights.
            pipe.vae = AutoencoderKL(
                block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                sample_size=512, scaling_factor=0.18215,
            )
            pipe.register_modules(vae=pipe.vae)
        pipe.save_pretrained(path, safe_serialization=True)
    return path


def _images(folder: str, size: int, n: int = 3) -> str:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return folder


def run_one(model: str, images: str, resolution: int, steps: int, cache: bool, threads: int) -> dict:
    """One training run in this process; returns its measurements (called in a subprocess)."""
    import torch

    torch.set_num_threads(threads)
    from adaprelora.training.dreambooth import TrainConfig, train

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(pretrained_model_name_or_path=model, instance_data_dir=images, instance_prompt="a sks toy",
                             output_dir=out, resolution=resolution, train_batch_size=1, max_train_steps=steps, seed=0,
                             report_to="none", center_crop=True, cache_latents=cache, skip_export_check=True,
                             optimizer="adamw", checkpointing_steps=10**6)
        step_times, cache_s, cache_start, last = [], 0.0, None, None
        for event in train(config):
            now = time.perf_counter()
            if event.phase == "cache" and cache_start is None:
                cache_start = now
            if event.phase == "cache":
                cache_s = now - cache_start
            if event.loss is not None:
                step_times.append(now)
            last = event
    per_step = float(np.median(np.diff(step_times))) if len(step_times) > 2 else float("nan")
    return {"step_s": per_step, "cache_s": cache_s, "peak_rss_bytes": last.peak_memory_bytes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--big-resolution", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--one", nargs=4, metavar=("MODEL", "IMAGES", "RESOLUTION", "CACHE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        model, images, resolution, cache = a.one
        print(json.dumps(run_one(model, images, int(resolution), a.steps, cache == "1", a.threads)))
        return 0

    configs = [("tiny-sd", 64), ("tiny-sdxl", 64), ("sd15-vae", a.big_resolution)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1")
    results = []
    with tempfile.TemporaryDirectory() as root:
        for kind, resolution in configs:
            model = _build(kind, root)
            images = _images(os.path.join(root, f"images-{resolution}"), resolution)
            row = {"model": kind, "resolution": resolution}
            for cache in (False, True):
                cmd = [sys.executable, __file__, "--steps", str(a.steps), "--threads", str(a.threads),
                       "--one", model, images, str(resolution), "1" if cache else "0"]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                row["cached" if cache else "plain"] = json.loads(proc.stdout.strip().splitlines()[-1])
            row["speedup"] = row["plain"]["step_s"] / row["cached"]["step_s"]
            results.append(row)
            print(f"{kind} at {resolution} px: {row['plain']['step_s']:.3f} s/step -> {row['cached']['step_s']:.3f} "
                  f"s/step cached ({row['speedup']:.2f}x)", file=sys.stderr)

    mib = 1024 * 1024
    print("| base model | px | step, plain (s) | step, cached (s) | speed-up | caching (s) | peak RSS plain / cached (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['resolution']} | {r['plain']['step_s']:.3f} | {r['cached']['step_s']:.3f} | "
              f"{r['speedup']:.2f}x | {r['cached']['cache_s']:.2f} | {r['plain']['peak_rss_bytes'] / mib:.0f} / "
              f"{r['cached']['peak_rss_bytes'] / mib:.0f} |")
    import torch

    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {a.threads}, no GPU",
              "torch": torch.__version__, "steps": a.steps, "batch_size": 1, "results": results}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
