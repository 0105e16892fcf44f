"""Evaluation of a fine-tuned model with each task's standard metric, gathered across processes.

GLUE: predictions of the classifier head scored by `metrics.glue_metrics`. GSM8K: greedy
completions whose final number must match the reference's.
"""
from __future__ import annotations

import torch

from . import metrics as task_metrics
from .tasks import TaskSpec


def _glue_predictions(logits: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    return logits.squeeze(-1).float() if spec.is_regression else logits.argmax(dim=-1)


@torch.no_grad()
def evaluate_glue(model, dataloader, accelerator, spec: TaskSpec) -> dict:
    """GLUE metrics of `model` over a prepared dataloader (gathered across processes)."""
    model.eval()
    preds, refs = [], []
    for batch in dataloader:
        with accelerator.autocast():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        p, r = accelerator.gather_for_metrics((_glue_predictions(logits, spec), batch["labels"]))
        preds.append(p.cpu())
        refs.append(r.cpu())
    model.train()
    predictions = torch.cat(preds).numpy()
    references = torch.cat(refs).numpy()
    return task_metrics.glue_metrics(spec.glue_task, predictions, references)


@torch.no_grad()
def heldout_loss(model, dataloader, accelerator, spec: TaskSpec) -> float:
    """The mean loss per example over a prepared dataloader with labels (GLUE: the head's cross
    entropy, or squared error for regression; causal LM: each example's mean token cross entropy),
    gathered across processes. Deterministic: eval mode, no sampling."""
    was_training = model.training
    model.eval()
    losses = []
    for batch in dataloader:
        with accelerator.autocast():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        labels = batch["labels"]
        if spec.family == "glue" and spec.is_regression:
            per_example = (logits.squeeze(-1) - labels.float()) ** 2
        elif spec.family == "glue":
            per_example = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        else:  # next-token prediction, ignoring the padded and prompt positions (-100)
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            token = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels,
                                                      ignore_index=-100, reduction="none")
            counted = (shift_labels != -100).sum(dim=1).clamp(min=1)
            per_example = token.sum(dim=1) / counted
        losses.append(accelerator.gather_for_metrics(per_example).cpu())
    model.train(was_training)
    return float(torch.cat(losses).double().mean())


@torch.no_grad()
def generate_answers(model, dataloader, accelerator, tokenizer, max_new_tokens: int) -> list[dict]:
    """Greedy completions of left-padded prompt batches: [{"index", "completion"}] over all processes."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    rows = []
    for batch in dataloader:
        with accelerator.autocast():
            out = unwrapped.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        # a model that goes on with an invented next question must not be scored on its numbers
        texts = [text.split("\nQuestion:")[0].strip() for text in texts]
        rows.extend({"index": int(i), "completion": t} for i, t in zip(batch["index"].tolist(), texts))
    unwrapped.train()
    return accelerator.gather_for_metrics(rows, use_gather_object=True)


def evaluate_gsm8k(model, dataloader, accelerator, tokenizer, eval_data, max_new_tokens: int):
    """(metrics, per-example rows): exact-match accuracy of the extracted final answers."""
    generated = generate_answers(model, dataloader, accelerator, tokenizer, max_new_tokens)
    rows = sorted({row["index"]: row for row in generated}.values(), key=lambda row: row["index"])
    references = eval_data["reference"]
    for row in rows:
        row["reference"] = task_metrics.extract_gsm8k_answer(references[row["index"]])
        row["prediction"] = task_metrics.extract_gsm8k_answer(row["completion"])
        row["correct"] = row["prediction"] is not None and row["prediction"] == row["reference"]
    accuracy = sum(row["correct"] for row in rows) / max(len(rows), 1)
    return {"accuracy": accuracy}, rows
