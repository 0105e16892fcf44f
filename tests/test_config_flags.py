"""The root scripts' flags take every default from their config dataclass, and a flag the config
does not know is an error when the parser is built or read, never silently dropped."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

import finetune_llm  # the repository root is on pytest's pythonpath
import train_dreambooth
from adaprelora.training.dreambooth.config import TrainConfig
from adaprelora.training.llm import FinetuneConfig
from adaprelora.training.options import ConfigFlags, field_default

SCRIPTS = {
    "train_dreambooth": (train_dreambooth, TrainConfig,
                         dict(pretrained_model_name_or_path="m", instance_data_dir="d")),
    "finetune_llm": (finetune_llm, FinetuneConfig, dict(task="gsm8k", model_name_or_path="m", output_dir="o")),
}


def _argv(required: dict) -> list[str]:
    return [part for name, value in required.items() for part in (f"--{name}", value)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_flags_gives_the_config_defaults_and_every_flag_is_a_field(script):
    module, config_cls, required = SCRIPTS[script]
    assert module.parse_args(_argv(required)) == config_cls(**required)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    actions = [a for a in module.build_parser()._actions if a.dest != "help"]
    assert len(actions) >= 30
    for action in actions:
        assert action.dest in fields, action.option_strings
        if not action.required:
            assert action.default == field_default(fields[action.dest]), action.option_strings


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_flag_the_config_does_not_know_is_an_error_at_start_up(script):
    module, config_cls, required = SCRIPTS[script]
    flags = ConfigFlags(argparse.ArgumentParser(), config_cls)
    with pytest.raises(TypeError, match=f"--new_setting: {config_cls.__name__} has no field 'new_setting'"):
        flags.add("new_setting", type=int, help="added to the parser only")
    with pytest.raises(TypeError, match="--bf17: .* has no field 'bf17'"):
        flags.add("bf17", dest="bf17", action="store_true")
    with pytest.raises(TypeError, match="do not restate"):
        flags.add("seed", type=int, default=1234)

    # A flag added to the parser behind the helper's back is refused when the config is built.
    parser = module.build_parser()
    parser.add_argument("--new_setting", type=int, default=3)
    args = parser.parse_args(_argv(required))
    with pytest.raises(TypeError, match="has no field for --new_setting"):
        config_cls.from_namespace(args)


def test_help_names_the_defaults_read_from_the_config():
    text = " ".join(finetune_llm.build_parser().format_help().split())  # whatever the terminal's width
    assert f"LoRA rank (default: {FinetuneConfig.lora_r})" in text
    assert "(default: adamw)" in text
