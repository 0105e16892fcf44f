#!/usr/bin/env python
"""Load a trained LoRA folder into its base pipeline with diffusers' `load_lora_weights` and check
that every tensor of the file landed in the UNet and the text encoder.

Needs only torch, diffusers, transformers, peft and safetensors (not this package), so it runs in a
separate environment, e.g. one with transformers 4.x (see docs/development.md):

    python scripts/check_lora_load.py BASE_PIPELINE_DIR LORA_DIR [--weight-name FILE]

Prints the versions, how many LoRA tensors of the file were loaded per model, and exits 1 when one
did not load or differs from the file.
"""
from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="diffusers Stable Diffusion pipeline folder")
    parser.add_argument("lora", help="folder with pytorch_lora_weights.safetensors")
    parser.add_argument("--weight-name", default="pytorch_lora_weights.safetensors")
    args = parser.parse_args()

    import diffusers
    import peft
    import torch
    import transformers
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}, "
          f"peft {peft.__version__}")
    # Only the parts a LoRA touches (the tokenizer and VAE are not needed, and a tokenizer saved by
    # another transformers major version may not load).
    unet = UNet2DConditionModel.from_pretrained(args.base, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(args.base, subfolder="text_encoder")
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    file = load_file(os.path.join(args.lora, args.weight_name))
    ids = torch.tensor([[0, 5, 6, 7, 1]])
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
    pipe.load_lora_weights(args.lora, weight_name=args.weight_name, adapter_name="check")
    with torch.no_grad():
        after = pipe.text_encoder(ids)[0]

    failures = 0
    for prefix, model in (("unet.", pipe.unet), ("text_encoder.", pipe.text_encoder)):
        expected = [k for k in file if k.startswith(prefix)]
        loaded = {n: p for n, p in model.named_parameters() if ".check." in n}
        matched = 0
        for name, param in loaded.items():
            module, which = name.split(".lora_")[0], "down" if ".lora_A." in name else "up"
            candidates = [f"{prefix}{module}.lora_linear_layer.{which}.weight",
                          f"{prefix}text_model.{module}.lora_linear_layer.{which}.weight",
                          f"{prefix}{module}.lora.{which}.weight",
                          f"{prefix}{module}.lora_{'A' if which == 'down' else 'B'}.weight"]
            key = next((c for c in candidates if c in file), None)
            if key is not None and torch.equal(param.detach().float(), file[key].float()):
                matched += 1
        ok = matched == len(expected) == len(loaded)
        failures += not ok
        print(f"{prefix.rstrip('.')}: {len(expected)} tensors in the file, {len(loaded)} LoRA tensors in the model, "
              f"{matched} equal to the file: {'ok' if ok else 'FAILED'}")
    print(f"text encoder output changed by the LoRA: max |diff| {float((after - before).abs().max()):.3g}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
