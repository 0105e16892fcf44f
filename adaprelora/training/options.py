"""Settings both trainers share: their flags declared from the config dataclass, optimizer name and
arguments, learning-rate schedules, loss scaling."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
from typing import Callable, Iterable, Optional

from .errors import UserError, first_line

# Learning-rate schedules both trainers accept (transformers' `get_scheduler` names).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                 "inverse_sqrt")


def field_default(field: dataclasses.Field):
    """A dataclass field's default (its factory called), or `dataclasses.MISSING`."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


class ConfigFlags:
    """A parser's flags declared against a config dataclass, which stays the one home of the defaults.

    `add("rank", type=int, help=...)` adds `--rank` with the default of the field `rank`; giving a
    `default` here, or a flag with no field (`dest` names the field when the flag's name differs,
    e.g. `--bf16` setting `mixed_precision`), raises `TypeError` while the parser is built, so a flag
    added to the parser alone fails at start-up instead of being parsed and dropped.
    """

    def __init__(self, parser: argparse.ArgumentParser, config_cls: type):
        self.parser = parser
        self.config_cls = config_cls
        self.fields = {f.name: f for f in dataclasses.fields(config_cls)}

    def add(self, name: str, *, dest: Optional[str] = None, group=None, **kwargs) -> None:
        field_name = dest or name
        if field_name not in self.fields:
            raise TypeError(f"--{name}: {self.config_cls.__name__} has no field {field_name!r}; add the field "
                            "(with its default) before the flag")
        if "default" in kwargs:
            raise TypeError(f"--{name}: its default is {self.config_cls.__name__}.{field_name}'s; do not restate it")
        default = field_default(self.fields[field_name])
        if default is not dataclasses.MISSING:
            kwargs["default"] = default
        (group or self.parser).add_argument(f"--{name}", dest=field_name, **kwargs)


def config_from_namespace(config_cls: type, args: argparse.Namespace):
    """`config_cls(**vars(args))`, raising `TypeError` for an attribute that is not one of its fields
    (a flag the config does not know is an error, never silently dropped)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(vars(args)) - names)
    if unknown:
        raise TypeError(f"{config_cls.__name__} has no field for {', '.join('--' + u for u in unknown)}; add the "
                        "field (with its default) or drop the flag")
    return config_cls(**vars(args))


def check_optimizer_name(name: str) -> str:
    """`--optimizer` as the factory spells it; `UserError` listing the choices when unknown."""
    from adaprelora import available_optimizers
    from adaprelora.factory import canonical_name

    key = canonical_name(name)
    if key not in available_optimizers():
        raise UserError(f"--optimizer: unknown optimizer {name!r}; choose one of: {', '.join(available_optimizers())}")
    return key


def check_lr_scheduler(name: str) -> None:
    if name not in LR_SCHEDULERS:
        raise UserError(f"--lr_scheduler {name!r} is not one of: {', '.join(LR_SCHEDULERS)}")


def parse_optimizer_args(items: Optional[Iterable[str]]) -> dict:
    """Parse `--optimizer_args key=value ...` (kohya style). Values are Python literals when they
    parse as one (`0.1`, `True`, `(0.9, 0.99)`), else strings (`variant=sgd`)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--optimizer_args expects key=value pairs, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise UserError(f"--optimizer_args: {key!r} is not a valid argument name")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        out[key] = value
    return out


# The class each optimizer name builds (the factory passes `--optimizer_args` on to it), for checking
# the arguments' names and forms against its signature before anything is loaded.
_OPTIMIZER_CLASSES = {
    "adaprelora": "adaprelora.optimizer:AdaPreLoRA", "adaprelora-sgd": "adaprelora.optimizer:AdaPreLoRA",
    "adamw": "torch.optim:AdamW", "loraplus": "torch.optim:AdamW", "scaled-gd": "adaprelora.baselines:ScaledLoRA",
    "scaled-adamw": "adaprelora.baselines:ScaledLoRA", "lora-pro": "adaprelora.baselines:LoRAPro",
    "prodigy": "prodigyopt:Prodigy", "adafactor": "transformers.optimization:Adafactor",
    "schedule-free": "schedulefree:AdamWScheduleFree", "adamw8bit": "bitsandbytes.optim:AdamW8bit",
    "lora-rite": "pytorch_optimizer.optimizer.lora_rite:LoRARite",
}


def _optimizer_parameters(key: str) -> Optional[dict[str, inspect.Parameter]]:
    """The keyword arguments optimizer `key` takes (its factory builder's and its class's), or None
    when they cannot be told (an optional package missing: building it will say so)."""
    import importlib

    from adaprelora import factory

    try:
        module, _, attr = _OPTIMIZER_CLASSES[key].partition(":")
        cls = getattr(importlib.import_module(module), attr)
        builder = factory._REGISTRY[key]
    except Exception:
        return None
    found: dict[str, inspect.Parameter] = {}
    for fn in (cls.__init__, builder):
        for name, param in inspect.signature(fn).parameters.items():
            if name not in ("self", "params", "model", "lr") and param.kind not in (param.VAR_KEYWORD,
                                                                                      param.VAR_POSITIONAL):
                found.setdefault(name, param)
    return found


def _expected_form(default) -> Optional[tuple[str, Callable[[object], bool]]]:
    """(what a value must look like, a test) for an argument whose default is `default`; None: any."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and (math.isfinite(v) or v == default)

    if isinstance(default, bool):
        return "True or False", lambda v: isinstance(v, bool)
    if isinstance(default, (int, float)):
        return "a finite number", number
    if isinstance(default, tuple) and default and all(isinstance(x, (int, float)) for x in default):
        return f"a tuple of {len(default)} numbers", lambda v: (
            isinstance(v, (tuple, list)) and len(v) == len(default)
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v))
    if isinstance(default, str):
        return "text", lambda v: isinstance(v, str)
    return None


def check_optimizer_args(name: str, args: dict) -> None:
    """`UserError` naming the key, the value and the expected form when an `--optimizer_args` entry
    is not an argument of optimizer `name`, or does not look like its default (a number, True/False,
    a tuple of numbers, text). None passes where the default is None or the type hint allows it."""
    if not isinstance(args, dict):
        raise UserError("--optimizer_args must be key=value pairs")
    key = check_optimizer_name(name)
    params = _optimizer_parameters(key)
    if params is None:
        return
    for arg, value in args.items():
        if arg not in params:
            raise UserError(f"--optimizer_args {arg}={value!r}: {key} takes no argument {arg!r}; it takes: "
                            f"{', '.join(sorted(params))}")
        default, annotation = params[arg].default, str(params[arg].annotation)
        if default is inspect.Parameter.empty or default is None:
            continue
        if value is None and ("Optional" in annotation or "None" in annotation):
            continue
        form = _expected_form(default)
        if form is not None and not form[1](value):
            example = str(default).replace(" ", "")
            raise UserError(f"--optimizer_args {arg}={value!r}: expected {form[0]} for {key}'s {arg!r}, "
                            f"e.g. {arg}={example}")


def build_optimizer(name: str, model, lr: float, optimizer_args: dict):
    """`create_optimizer` with its argument errors as a `UserError` naming the flags."""
    from adaprelora import create_optimizer

    try:
        return create_optimizer(name, model, lr=lr, **optimizer_args)
    except (ValueError, TypeError, ImportError) as err:
        raise UserError(f"--optimizer {name} / --optimizer_args: {first_line(err)}") from None


def optimizer_mode(optimizer, train: bool) -> None:
    """Put an optimizer with train and eval modes (Schedule-Free AdamW) in one of them: `train=True`
    before a training step, `False` before the weights are evaluated, sampled or saved (its eval
    mode puts the averaged weights in the parameters). A no-op for other optimizers."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    method = getattr(inner, "train" if train else "eval", None)
    if callable(method):
        method()


def build_lr_scheduler(name: str, optimizer, *, warmup_steps: int, total_steps: int, num_processes: int = 1,
                       num_cycles: int = 1, power: float = 1.0):
    """The schedule `name` over `total_steps` optimizer steps.

    accelerate steps a prepared scheduler once per process at each optimizer step, so the step
    counts are multiplied by `num_processes`. `num_cycles` applies to cosine_with_restarts and
    `power` to polynomial.
    """
    from transformers import get_scheduler

    specific = {"cosine_with_restarts": {"num_cycles": num_cycles}, "polynomial": {"power": power}}
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps * num_processes,
                         num_training_steps=total_steps * num_processes,
                         scheduler_specific_kwargs=specific.get(name, {}))


def attach_grad_scaler(optimizer, scaler) -> None:
    """Tell an optimizer that reads gradients during backward (AdaPreLoRA's exact energies) which
    loss scaler is in use, so it can undo the fp16 loss scale. A no-op for other optimizers."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    setter = getattr(inner, "set_grad_scaler", None)
    if setter is not None and scaler is not None:
        setter(scaler)


__all__ = ["LR_SCHEDULERS", "ConfigFlags", "attach_grad_scaler", "build_lr_scheduler", "build_optimizer",
           "check_lr_scheduler", "check_optimizer_args", "check_optimizer_name", "config_from_namespace",
           "field_default", "optimizer_mode", "parse_optimizer_args"]
