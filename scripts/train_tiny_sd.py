"""Train the built-in text-to-image model (`assets/tiny-sd`) from scratch on generated shapes.

    python scripts/train_tiny_sd.py                          # the shipped weights: one from-scratch run, 55 min
                                                             # on 2 free CPU cores (the UNet stops at
                                                             # --time_limit_minutes)
    python scripts/train_tiny_sd.py --init_from DIR ...      # a further stage: train a tiny-sd folder's text
                                                             # encoder and UNet further
    python scripts/train_tiny_sd.py --quick --output_dir /tmp/tiny-sd   # a few steps, to check it runs
"""
from __future__ import annotations

import argparse
import os
import sys

from adaprelora.tiny_t2i.train import TinyT2IConfig, run
from adaprelora.training.errors import UserError


def parse_args(argv=None) -> TinyT2IConfig:
    d = TinyT2IConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default=d.output_dir, help="folder to write (replaced) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num_images", type=int, default=d.num_images, help="training images drawn")
    p.add_argument("--vae_steps", type=int, default=d.vae_steps)
    p.add_argument("--vae_decoder_steps", type=int, default=d.vae_decoder_steps,
                   help="then train the VAE decoder alone, encoder frozen (latents unchanged; works with --init_from)")
    p.add_argument("--unet_steps", type=int, default=d.unet_steps)
    p.add_argument("--attention_at_16", action=argparse.BooleanOptionalAction, default=d.unet_attention_at_16,
                   help="attention at the UNet's 16 x 16 level as well: about 1.7x slower steps (default: off)")
    p.add_argument("--no_attention_at_16", dest="attention_at_16", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--judge_steps", type=int, default=d.judge_steps)
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument("--time_limit_minutes", type=float, default=d.time_limit_minutes,
                   help="stop UNet training this many minutes after the start; its learning rate reaches zero by then "
                        "if the steps would not (default: %(default)s)")
    p.add_argument("--init_from", default=None,
                   help="continue from this tiny-sd folder: keep its VAE (and judge with --judge_steps 0), train "
                        "its text encoder and UNet further (--unet_steps 0: only --vae_decoder_steps)")
    p.add_argument("--warmup_steps", type=int, default=d.warmup_steps)
    p.add_argument("--quick", action="store_true", help="a few steps of every stage (a smoke test, not a model)")
    a = p.parse_args(argv)
    cfg = TinyT2IConfig(output_dir=a.output_dir, seed=a.seed, num_images=a.num_images, vae_steps=a.vae_steps,
                        vae_decoder_steps=a.vae_decoder_steps,
                        unet_steps=a.unet_steps, unet_attention_at_16=a.attention_at_16,
                        judge_steps=a.judge_steps, batch_size=a.batch_size, lr=a.lr,
                        threads=a.threads, time_limit_minutes=a.time_limit_minutes,
                        init_from=a.init_from, warmup_steps=a.warmup_steps)
    if a.quick:
        # A few steps of each stage asked for (a stage given 0 steps stays off).
        cfg.num_images = 256
        cfg.vae_steps, cfg.unet_steps, cfg.judge_steps = (min(n, 3) for n in (cfg.vae_steps, cfg.unet_steps, cfg.judge_steps))
        cfg.vae_decoder_steps = min(cfg.vae_decoder_steps, 2)
        cfg.batch_size, cfg.warmup_steps, cfg.eval_per_split, cfg.num_inference_steps = 8, 1, 4, 2
        cfg.vae_batch_size, cfg.judge_eval_images = 8, 64
    if cfg.time_limit_minutes is not None and cfg.time_limit_minutes < 0:
        p.error(f"--time_limit_minutes must be positive (or 0 for no limit), got {cfg.time_limit_minutes}")
    out = os.path.abspath(cfg.output_dir)
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, "model_index.json")):
        p.error(f"--output_dir {cfg.output_dir} is a non-empty folder that holds no model; "
                "give a new folder or a previous tiny-sd folder (it is replaced)")
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        report = run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    q = report["quality"]
    print(f"wrote {report['config']['output_dir']}: train shape/colour/bg "
          f"{q['train']['shape']:.2f}/{q['train']['colour']:.2f}/{q['train']['background']:.2f}, held-out all "
          f"{q['held_out']['all']:.2f}, {report['timings']['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
