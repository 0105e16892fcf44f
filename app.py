"""`python app.py`: the DreamBooth LoRA trainer in the browser (upload, train, watch, generate).

    python app.py [--host 127.0.0.1] [--port 7860] [--base-model ID_OR_DIR] [--output-root DIR]
                  [--share] [--auth user:pass]
"""
from __future__ import annotations

import argparse
import os

from adaprelora.app import DEFAULT_BASE_MODEL, parse_auth


def parse_args(input_args=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The DreamBooth LoRA trainer in the browser.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--host", type=str, default="127.0.0.1",
                        help="address to bind; anything but a loopback address exposes the page to the network")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--base-model", type=str, default=DEFAULT_BASE_MODEL,
                        help="the built-in tiny-sd (works offline), or Stable Diffusion 1.x/2.x: a Hub id or a local diffusers folder")
    parser.add_argument("--output-root", type=str, default="outputs",
                        help="folder for trained LoRAs, samples, generated images and Gradio's upload cache")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--auth", type=str, default=None, help="require a login, given as user:password")
    args = parser.parse_args(input_args)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be between 1 and 65535, got {args.port}")
    try:
        args.auth = parse_auth(args.auth)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(input_args=None) -> None:
    args = parse_args(input_args)
    # Gradio's upload cache goes inside the output root too, so the app writes nowhere else.
    os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(os.path.abspath(args.output_root), ".gradio-cache"))
    from adaprelora.app import build_demo, launch

    demo = build_demo(base_model=args.base_model, output_root=args.output_root)
    launch(demo, host=args.host, port=args.port, share=args.share, auth=args.auth, output_root=args.output_root)


if __name__ == "__main__":
    main()
