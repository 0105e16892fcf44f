"""Task data for the LLM trainer: the splits (local files or the Hub), their tokenization and batching.

GLUE becomes sentence (pair) classification inputs; GSM8K becomes causal-LM examples whose loss
covers only the answer, plus left-padded prompts for generation. The prompt format lives here so
that training, evaluation and the quality benchmark share it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Optional

import torch

from ..errors import UserError, first_line
from .sources import SHIPPED_DATA, offline_when_unreachable
from .tasks import TaskSpec, check_columns, check_labels, check_texts

if TYPE_CHECKING:
    from .config import FinetuneConfig

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens and padding)
GSM8K_PROMPT = "Question: {question}\nAnswer:"
DATASETS_CACHE_DIR = "datasets_cache"  # under --output_dir: what datasets builds from local files


def _builder_for(path: str) -> tuple[str, dict]:
    lower = path.lower()
    if lower.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "json", {}
    if lower.endswith((".csv", ".csv.gz")):
        return "csv", {}
    if lower.endswith((".tsv", ".tsv.gz")):
        return "csv", {"delimiter": "\t"}
    raise UserError(f"{path}: unsupported file type (use .jsonl, .json, .csv or .tsv)")


def _root_cause(err: BaseException) -> BaseException:
    """The innermost cause of `err` (datasets wraps a JSON parse error in a generic one)."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        err = err.__cause__
        seen.add(id(err))
    return err


@contextlib.contextmanager
def _quiet_datasets():
    """datasets logs a failed parse at ERROR level (twice with a root handler) before raising; the
    UserError raised instead says the same in one line, so its logs are muted meanwhile."""
    import datasets

    previous = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(previous)


def _load_file(path: str, spec: TaskSpec, cache_dir: Optional[str] = None):
    import datasets

    builder, kwargs = _builder_for(path)
    if os.path.isfile(path) and not _has_content(path):
        raise UserError(f"{path}: the file is empty (no rows)")
    try:
        with _quiet_datasets():
            data = datasets.load_dataset(builder, data_files={"data": path}, split="data", cache_dir=cache_dir,
                                         **kwargs)
    except Exception as err:  # malformed JSON/CSV: one line naming the file and the parser's reason
        cause = _root_cause(err)
        raise UserError(f"{path}: could not be read as {builder} ({type(cause).__name__}: {first_line(cause)})") \
            from None
    check_columns(data.column_names, spec, where=path)
    if len(data) == 0:
        raise UserError(f"{path}: no rows")
    return data


def _has_content(path: str) -> bool:
    """Whether the file holds anything but whitespace (compressed files are taken as non-empty)."""
    if path.lower().endswith(".gz"):
        return os.path.getsize(path) > 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return True
    return False


def datasets_cache_dir(config: FinetuneConfig) -> str:
    """Where the datasets library keeps what it builds from local data files: inside the run's
    output folder (`<output_dir>/datasets_cache`), never the user's home. Hub data keeps the Hugging
    Face cache (`HF_DATASETS_CACHE`, by default under ~/.cache/huggingface), where it is shared
    between runs."""
    return os.path.join(config.output_dir, DATASETS_CACHE_DIR)


def load_task_splits(config: FinetuneConfig, spec: TaskSpec) -> dict:
    """{"train": Dataset, <eval split>: Dataset, ...}: from the local files if given, else the Hub.

    Every row is checked before tokenization: text columns hold text (no nulls), GLUE labels are
    valid class ids (or numbers, STS-B); errors name the file (or Hub split), row and column.
    """
    where = {}
    if config.train_file:
        cache_dir = datasets_cache_dir(config)
        files = {spec.train_split: config.train_file, spec.eval_splits[0]: config.validation_file}
        if config.validation_mismatched_file:
            files[spec.eval_splits[1]] = config.validation_mismatched_file
        splits = {name: _load_file(path, spec, cache_dir) for name, path in files.items()}
        where = dict(files)
    else:
        import datasets

        with offline_when_unreachable() as offline:
            try:
                with _quiet_datasets():
                    hub = datasets.load_dataset(spec.hub_path, spec.hub_config)
            except Exception as err:  # offline, no such dataset...: say what to do instead
                why = (f"the Hub is unreachable ({offline}) and it is not in the datasets cache" if offline
                       else first_line(err))
                raise UserError(
                    f"could not load {spec.hub_path} ({spec.hub_config}) from the Hub: {why}; to train offline "
                    f"pass --train_file and --validation_file (small sst2 and gsm8k files are in {SHIPPED_DATA})"
                ) from None
        splits = {name: hub[name] for name in (spec.train_split,) + spec.eval_splits}
        for name, data in splits.items():
            where[name] = f"{spec.hub_path}/{spec.hub_config} [{name}]"
            check_columns(data.column_names, spec, where=where[name])
    for name, data in splits.items():
        limit = config.max_train_samples if name == spec.train_split else config.max_eval_samples
        if limit is not None and limit < len(data):
            splits[name] = data.select(range(limit))
        if len(splits[name]) == 0:
            raise UserError(f"the {name} split of {spec.name} is empty")
        check_texts(splits[name], spec, where=where[name])
        if spec.family == "glue":
            check_labels(splits[name][spec.label_column], spec, where=where[name])
    return splits


def format_gsm8k_prompt(question: str) -> str:
    return GSM8K_PROMPT.format(question=question.strip())


def build_causal_lm_example(tokenizer, prompt: str, answer: str, max_length: int) -> Optional[dict]:
    """Token ids of prompt + " answer" + EOS, with labels = IGNORE_INDEX on the prompt tokens.

    The prompt is tokenized on its own (as at generation time) so the boundary is exact. Too long
    examples are cut at `max_length`; None when no answer token survives the cut.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_glue(data, tokenizer, spec: TaskSpec, max_length: int):
    """Tokenized (pairs of) sentences plus a `labels` column (float for STS-B)."""

    def encode(batch):
        texts = [batch[column] for column in spec.text_columns]
        out = tokenizer(*texts, truncation=True, max_length=max_length)
        labels = batch[spec.label_column]
        out["labels"] = [float(v) for v in labels] if spec.is_regression else [int(v) for v in labels]
        return out

    return data.map(encode, batched=True, remove_columns=data.column_names, desc="tokenizing")


def tokenize_gsm8k_train(data, tokenizer, max_length: int):
    def encode(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for question, answer in zip(batch["question"], batch["answer"]):
            example = build_causal_lm_example(tokenizer, format_gsm8k_prompt(question), answer, max_length)
            if example is not None:
                for key in out:
                    out[key].append(example[key])
        return out

    encoded = data.map(encode, batched=True, remove_columns=data.column_names, desc="tokenizing")
    if len(encoded) < len(data):
        logger.warning("%d GSM8K examples had no answer token within --max_seq_length %d and were dropped",
                       len(data) - len(encoded), max_length)
    if len(encoded) == 0:
        raise UserError(f"no GSM8K example fits in --max_seq_length {max_length}: raise it")
    return encoded


def tokenize_gsm8k_eval(data, tokenizer, max_length: int):
    def encode(batch):
        prompts = [format_gsm8k_prompt(q) for q in batch["question"]]
        ids = [tokenizer(p, add_special_tokens=True)["input_ids"][-max_length:] for p in prompts]
        return {"input_ids": ids, "reference": batch["answer"], "index": batch["__index"]}

    data = data.add_column("__index", list(range(len(data))))
    return data.map(encode, batched=True, remove_columns=data.column_names, desc="tokenizing")


class CausalLMCollator:
    """Pads input_ids (pad id), attention_mask (0) and labels (IGNORE_INDEX) on the right, or, for
    generation batches without labels, on the left so every prompt ends at the last position."""

    def __init__(self, pad_token_id: int, left: bool = False):
        self.pad_token_id = pad_token_id
        self.left = left

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": []}
        has_labels = "labels" in features[0]
        if has_labels:
            batch["labels"] = []
        for f in features:
            ids = list(f["input_ids"])
            gap = width - len(ids)
            rows = {"input_ids": (ids, self.pad_token_id), "attention_mask": ([1] * len(ids), 0)}
            if has_labels:
                rows["labels"] = (list(f["labels"]), IGNORE_INDEX)
            for key, (values, pad) in rows.items():
                batch[key].append([pad] * gap + values if self.left else values + [pad] * gap)
        out = {key: torch.tensor(values, dtype=torch.long) for key, values in batch.items()}
        if "index" in features[0]:
            out["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
        return out
