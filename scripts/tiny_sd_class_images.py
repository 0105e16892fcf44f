"""Write the built-in model's prior-preservation set: ordinary scenes with sidecar captions.

    python scripts/tiny_sd_class_images.py ./class-shapes --count 64
    accelerate launch train_dreambooth.py --pretrained_model_name_or_path assets/tiny-sd ... \
        --with_prior_preservation --class_data_dir ./class-shapes --num_class_images 64 ...

The trainer reads each `.txt` as that image's prompt (kohya's captioned regularisation images), so the
LoRA is held to every ordinary prompt, not one class prompt.
"""
from __future__ import annotations

import argparse
import os
import sys

from adaprelora.tiny_t2i.personalise import DREAMBOOTH_DEFAULTS, write_class_images


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="where to write the PNGs and their .txt captions")
    p.add_argument("--count", type=int, default=DREAMBOOTH_DEFAULTS["num_class_images"],
                   help="how many images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    if a.count < 1:
        p.error(f"--count must be at least 1, got {a.count}")
    if os.path.isfile(a.folder):
        p.error(f"{a.folder} is a file; give a folder to write the class images into")
    paths = write_class_images(a.folder, a.count, seed=a.seed)
    print(f"wrote {len(paths)} captioned class images to {a.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
