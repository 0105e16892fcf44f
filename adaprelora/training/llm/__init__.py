"""LoRA fine-tuning of language models on GLUE and GSM8K: what is specific to it, around the shared loop.

    from adaprelora.training.llm import FinetuneConfig, finetune, train

`config` (FinetuneConfig, `finetune_llm.py`'s flag names), `tasks` (which tasks, what their data
must hold), `sources` (the built-in model, and a quick error when the Hub is unreachable), `data`
(loading, tokenization, batching), `model` (tokenizer, LoRA model, trained tensors), `eval` and
`metrics` (each task's standard metric), `trainer` (`train()`, a generator of `TrainEvent`s) and
`cli` (`finetune()`, its command-line driver), as in `dreambooth/`.
"""
from ..loop import TrainEvent
from ..options import LR_SCHEDULERS
from .cli import finetune
from .config import FinetuneConfig
from .data import (
    GSM8K_PROMPT,
    IGNORE_INDEX,
    CausalLMCollator,
    build_causal_lm_example,
    format_gsm8k_prompt,
    load_task_splits,
)
from .tasks import EVAL_SUFFIXES, TASK_NAMES, TaskSpec, check_columns, check_labels, get_task
from .trainer import train

__all__ = ["EVAL_SUFFIXES", "GSM8K_PROMPT", "IGNORE_INDEX", "LR_SCHEDULERS", "TASK_NAMES", "CausalLMCollator",
           "FinetuneConfig", "TaskSpec", "TrainEvent", "build_causal_lm_example", "check_columns", "check_labels",
           "finetune", "format_gsm8k_prompt", "get_task", "load_task_splits", "train"]
