"""Quality benchmark of the LoRA optimizers: one command per suite.

    python -m benchmarks.quality conditioning --quick
    python -m benchmarks.quality classification --quick
    python -m benchmarks.quality gsm8k --quick
    python -m benchmarks.quality all --smoke        # what CI runs: a few steps per suite

Each suite prints a table, writes `benchmarks/results/quality_<suite>[_<profile>].json` and PNG plots
under `docs/img/`. `docs/results.md` summarises the committed runs.
"""
