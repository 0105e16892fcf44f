"""How fast the built-in model loads and draws on this machine: load time, one 64 x 64 image with
DDIM at 25 steps (classifier-free guidance on), and a batch of 8. Prints a table, writes JSON.

    python benchmarks/tiny_sd_speed.py [--threads 1] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from adaprelora.tiny_t2i import TINY_SD_DIR

OUT = os.path.join(os.path.dirname(__file__), "results", "tiny_sd_speed.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from diffusers import StableDiffusionPipeline

    t = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD_DIR)
    load_s = time.perf_counter() - t
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on a blue background"
    pipe(prompt, num_inference_steps=25, guidance_scale=5.0)  # warm-up
    rows = {}
    for batch in (1, 8):
        times = []
        for i in range(a.repeats):
            g = torch.Generator().manual_seed(i)
            t = time.perf_counter()
            pipe([prompt] * batch, num_inference_steps=25, guidance_scale=5.0, generator=g)
            times.append(time.perf_counter() - t)
        rows[batch] = statistics.median(times)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {a.threads}",
              "torch": torch.__version__, "load_s": load_s,
              "image_s_batch1": rows[1], "image_s_batch8_per_image": rows[8] / 8}
    print(f"| what | seconds |\n|---|---|\n| load the pipeline | {load_s:.2f} |\n"
          f"| one image, 25 DDIM steps, guidance 5 | {rows[1]:.3f} |\n"
          f"| per image in a batch of 8 | {rows[8] / 8:.3f} |")
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
