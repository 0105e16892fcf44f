"""AdaPreLoRA inside `transformers.Trainer` (and so TRL's trainers, which subclass it), on a PEFT
model of a tiny Llama built in code: exact energies through the Trainer's wrapping, gradient
accumulation, `max_grad_norm`, checkpoints with the optimizer state, and an exact resume."""
from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from adaprelora import AdaPreLoRA, create_optimizer  # noqa: E402
from adaprelora.testing.tiny_lm import tiny_llama  # noqa: E402

SEQ_LEN, N_EXAMPLES = 12, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random token sequences, labels = inputs (causal LM)."""

    def __init__(self, n: int = N_EXAMPLES, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, 260, (n, SEQ_LEN), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
                "labels": self.ids[i]}


def _peft_model(lora_seed: int = 1):
    """The same tiny Llama every time (its weights are not in the checkpoints); LoRA factors drawn
    with `lora_seed`."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          lora_dropout=0.0))
    torch.manual_seed(lora_seed)  # B starts at zero: give it a value so A's gradient is not zero either
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def _args(output_dir, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(output_dir), use_cpu=True, report_to=[], per_device_train_batch_size=2,
                gradient_accumulation_steps=2, max_steps=6, learning_rate=2e-3, max_grad_norm=1.0,
                lr_scheduler_type="linear", warmup_steps=0, logging_steps=1, save_strategy="steps", save_steps=3,
                seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(model, args, optimizer):
    from transformers import Trainer

    return Trainer(model=model, args=args, train_dataset=TokenDataset(), optimizers=(optimizer, None))


def _lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Six optimizer steps of 2 x 2 micro-batches, checkpoints at steps 3 and 6, with spies on
    what the optimizer reads at each step."""
    from adaprelora import functional

    out = tmp_path_factory.mktemp("hf-trainer") / "run"
    model = _peft_model()
    optimizer = create_optimizer("adaprelora", model, lr=2e-3)
    seen = {"steps": 0, "exact": [], "grad_norms": [], "tangent_calls": 0}
    take = optimizer._collector.take

    def spy_take(indices):
        rows, cols = take(indices)
        seen["exact"].append(all(r is not None for r in rows))
        return rows, cols

    def pre_step(opt, args, kwargs):
        seen["steps"] += 1
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        seen["grad_norms"].append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    original_tangent = functional.tangent_energies

    def counting_tangent(*a, **k):
        seen["tangent_calls"] += 1
        return original_tangent(*a, **k)

    optimizer._collector.take = spy_take
    optimizer.register_step_pre_hook(pre_step)
    functional.tangent_energies = counting_tangent
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = _trainer(model, _args(out), optimizer)
            result = trainer.train()
    finally:
        functional.tangent_energies = original_tangent
    return {"out": out, "trainer": trainer, "model": model, "optimizer": optimizer, "seen": seen,
            "result": result, "warnings": [str(w.message) for w in caught]}


@pytest.mark.timeout(300)
def test_exact_energies_are_read_through_the_trainer(uninterrupted):
    seen = uninterrupted["seen"]
    buckets = len(uninterrupted["optimizer"]._buckets)  # pairs of one shape are stepped together
    assert seen["steps"] == 6 and len(seen["exact"]) == 6 * buckets
    assert all(seen["exact"]), "every step found the hooks' energies for every LoRA pair"
    assert seen["tangent_calls"] == 0, "no fallback to tangent energies"
    assert not [w for w in uninterrupted["warnings"] if "tangent energies" in w]


@pytest.mark.timeout(300)
def test_gradient_accumulation_and_max_grad_norm_work(uninterrupted, tmp_path):
    trainer, seen = uninterrupted["trainer"], uninterrupted["seen"]
    assert trainer.state.global_step == 6 and seen["steps"] == 6, "one optimizer step per 2 micro-batches"
    logged = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert len(logged) == 6 and all(torch.isfinite(torch.tensor(logged)))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0], losses

    # With a tiny max_grad_norm the optimizer sees clipped gradients.
    model = _peft_model()
    optimizer = create_optimizer("adaprelora", model, lr=2e-3)
    norms = []
    optimizer.register_step_pre_hook(lambda opt, a, k: norms.append(float(torch.linalg.vector_norm(torch.stack(
        [p.grad.norm() for g in opt.param_groups for p in g["params"] if p.grad is not None])))))
    _trainer(model, _args(tmp_path, max_steps=2, max_grad_norm=1e-3, save_strategy="no"), optimizer).train()
    assert len(norms) == 2 and all(n <= 1e-3 * 1.001 for n in norms), norms


@pytest.mark.timeout(300)
def test_checkpoints_hold_the_optimizer_state_and_load_with_weights_only(uninterrupted):
    out = uninterrupted["out"]
    assert {"checkpoint-3", "checkpoint-6"} <= set(os.listdir(out))
    state = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)
    per_param = [s for s in state["state"].values() if s]
    assert per_param, "the checkpoint holds per-parameter optimizer state"
    keys = set().union(*per_param)
    assert {"exp_avg", "exp_avg_sq", "adafactor_row", "adafactor_col", "step"} <= keys, keys
    assert all(float(s["step"]) == 3 for s in per_param if "step" in s)


@pytest.mark.timeout(300)
def test_resume_from_checkpoint_continues_exactly_like_the_uninterrupted_run(uninterrupted, tmp_path):
    run = tmp_path / "resumed"
    run.mkdir()
    shutil.copytree(uninterrupted["out"] / "checkpoint-3", run / "checkpoint-3")
    model = _peft_model(lora_seed=7)  # other LoRA values: the checkpoint must bring back everything
    optimizer = create_optimizer("adaprelora", model, lr=2e-3)
    trainer = _trainer(model, _args(run), optimizer)
    trainer.train(resume_from_checkpoint=str(run / "checkpoint-3"))
    assert trainer.state.global_step == 6

    expected, got = _lora_params(uninterrupted["model"]), _lora_params(model)
    assert expected.keys() == got.keys() and expected
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
    opt_a = torch.load(uninterrupted["out"] / "checkpoint-6" / "optimizer.pt", weights_only=True)
    opt_b = torch.load(run / "checkpoint-6" / "optimizer.pt", weights_only=True)
    for index, state in opt_a["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(opt_b["state"][index][key], value, rtol=0, atol=1e-6,
                                       msg=f"{index}.{key}")


@pytest.mark.timeout(300)
def test_optimizer_cls_and_kwargs_builds_it_from_the_trainers_param_groups(tmp_path):
    """The Trainer passes its own parameter groups (no model); here the pairs are given explicitly
    (without them they are found in the groups: the next test) and the energies come from `.grad`
    (stats="tangent"); `optimizers=(...)` keeps exact energies."""
    from peft.tuners.lora import LoraLayer
    from transformers import Trainer

    model = _peft_model()
    pairs = [(m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"])
             for m in model.modules() if isinstance(m, LoraLayer)]
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2, save_strategy="no"),
                      train_dataset=TokenDataset(), optimizer_cls_and_kwargs=(AdaPreLoRA, {"pairs": pairs}))
    before = _lora_params(model)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, AdaPreLoRA) and trainer.optimizer.optimizer.stats == "tangent"
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[n], p) for n, p in _lora_params(model).items())


@pytest.mark.timeout(300)
def test_list_built_optimizer_from_the_trainers_groups_resumes_exactly(tmp_path):
    """`optimizer_cls_and_kwargs` without `pairs`: the pairs are found in the Trainer's own param
    groups (by order), and a run resumed from its checkpoint ends where the uninterrupted one does."""
    from peft.tuners.lora import LoraLayer
    from transformers import Trainer

    def run(out, lora_seed, resume=None):
        model = _peft_model(lora_seed)
        trainer = Trainer(model=model, args=_args(out), train_dataset=TokenDataset(),
                          optimizer_cls_and_kwargs=(AdaPreLoRA, {"lr": 2e-3}))
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    model, trainer = run(tmp_path / "full", lora_seed=1)
    opt = trainer.optimizer.optimizer
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(opt.pairs) == len(layers) == 4 and opt.stats == "tangent"
    assert {(id(p.A), id(p.B)) for p in opt.pairs} == {
        (id(m.lora_A["default"].weight), id(m.lora_B["default"].weight)) for m in layers}
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed, _ = run(resumed_dir, lora_seed=7, resume=str(resumed_dir / "checkpoint-3"))
    expected, got = _lora_params(model), _lora_params(resumed)
    assert expected.keys() == got.keys() and expected
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(value, _lora_params(_peft_model(1))[name]) for name, value in expected.items())
