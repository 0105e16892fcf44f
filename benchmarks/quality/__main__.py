"""python -m benchmarks.quality {conditioning,classification,gsm8k,e2e,studies,dreambooth,dreambooth-others,dreambooth-nopp,dreambooth-heldout,all} [--smoke|--quick|--full]

dreambooth: the DreamBooth headline of docs/results.md, small (benchmarks/quality/dreambooth_quick.py);
dreambooth-others: Prodigy, Scaled AdamW and Adafactor judge-tuned and paired with that confirmation
(benchmarks/quality/dreambooth_others.py);
dreambooth-nopp: the judge suite without prior preservation (suite 4, writes quality_dreambooth.json);
dreambooth-heldout: the held-out-loss suite (suite 4b)."""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["conditioning", "classification", "gsm8k", "e2e", "studies", "dreambooth",
                                          "dreambooth-others", "dreambooth-nopp", "dreambooth-heldout", "rank-alpha", "all"])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--smoke", action="store_const", dest="profile", const="smoke", help="a few steps (CI)")
    group.add_argument("--quick", action="store_const", dest="profile", const="quick", help="CPU profile (default)")
    group.add_argument("--full", action="store_const", dest="profile", const="full", help="longer runs, more seeds")
    parser.add_argument("--configs", default=None, help="comma-separated optimizer labels (default: the profile's)")
    parser.add_argument("--out-dir", default=None, help="JSON folder (default benchmarks/results)")
    parser.add_argument("--img-dir", default=None, help="plot folder (default docs/img)")
    parser.add_argument("--lr", type=float, default=None,
                        help="gsm8k only: the one lr of the AdamW-type optimizers (default: the suite's, 1e-3)")
    parser.add_argument("--tag", default=None, help="suffix of the JSON name, e.g. lr3e-3 -> quality_gsm8k_lr3e-3.json")
    parser.add_argument("--subjects", default=None, metavar="DIR",
                        help="dreambooth-nopp only: teach the subjects in DIR (one sub-folder of images per subject; the "
                             "first is used to tune the lr, the others to confirm) instead of the built-in ones; "
                             "dreambooth-heldout: comma-separated built-in subjects (default: the stage's)")
    parser.add_argument("--stage", choices=["tune", "confirm"], default="tune",
                        help="dreambooth-heldout: sweep lrs on the tuning subject, or run the tuned lrs on the others")
    parser.add_argument("--seeds", default=None, help="dreambooth-heldout: comma-separated training seeds")
    parser.add_argument("--lrs", default=None,
                        help="dreambooth-heldout: comma-separated lrs (tune: the starting grid; confirm: one per config)")
    parser.add_argument("--no-extend", action="store_true",
                        help="dreambooth-heldout: do not extend a grid whose best lr is at an end")
    parser.add_argument("--report", action="store_true",
                        help="dreambooth, dreambooth-others, dreambooth-heldout: print the tables of the JSON only")
    parser.add_argument("--resume", action="store_true",
                        help="dreambooth, dreambooth-others: keep the finished runs of its JSON and run only the missing ones")
    parser.add_argument("--model", default=None,
                        help="dreambooth, dreambooth-nopp: the base model folder (default: assets/tiny-sd)")
    parser.add_argument("--workers", type=int, default=2,
                        help="dreambooth: worker processes running the runs in parallel (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine more threads slowed every step)")
    args = parser.parse_args(argv)
    profile = args.profile or "quick"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    torch.set_num_threads(args.threads)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.suite in ("dreambooth", "dreambooth-others", "dreambooth-heldout"):
        from . import dreambooth_others, dreambooth_quick, heldout

        run = {"dreambooth": dreambooth_quick.main, "dreambooth-others": dreambooth_others.main,
               "dreambooth-heldout": heldout.main}[args.suite]
        return run(args, log=lambda msg: print(msg, flush=True))
    from . import common as C

    configs = args.configs.split(",") if args.configs else None
    suites = ["conditioning", "classification", "gsm8k"] if args.suite == "all" else [args.suite]

    def log(msg):
        print(msg, flush=True)

    for suite in suites:
        t0 = time.perf_counter()
        if suite == "conditioning":
            from .conditioning import run_suite
        elif suite == "classification":
            import functools

            from .classification import run_suite

            run_suite = functools.partial(run_suite, out_dir=args.out_dir, tag=args.tag)  # merges into its JSON
        elif suite == "studies":
            from .studies import run_suite
        elif suite == "rank-alpha":
            from .rank_alpha import run_suite
        elif suite == "e2e":
            import functools

            from .e2e import run_suite

            run_suite = functools.partial(run_suite, out_dir=args.out_dir, tag=args.tag)  # merges into its JSON
        elif suite == "dreambooth-nopp":
            import functools

            from .dreambooth import run_suite

            run_suite = functools.partial(run_suite, subjects_dir=args.subjects, model_dir=args.model)
        else:
            from . import gsm8k
            from .gsm8k import run_suite

            if args.lr is not None:
                gsm8k.SETUP["lr"] = args.lr
        if args.tag and args.img_dir is None:
            args.img_dir = os.path.join(C.IMG_DIR, "extra")  # keep the main plots
        result = run_suite(profile, log=log, configs=configs, img_dir=args.img_dir)
        result["command"] = "python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv)
        result["threads"] = args.threads
        name = {"dreambooth-nopp": "dreambooth", "rank-alpha": "rank_alpha"}.get(suite, suite)  # the committed results keep their file
        path = C.write_json(result, name + (f"_{args.tag}" if args.tag else ""), profile, args.out_dir)
        log(f"[{suite}] wrote {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
