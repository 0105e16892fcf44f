"""LoHa and LoKr networks (`--network_module lycoris --network_args algo=loha|lokr ...`) from the
lycoris-lora package itself, as kohya sd-scripts users write them.

The network is built by the package's kohya entry point (`lycoris.kohya.create_network`, what
`--network_module lycoris.kohya` runs in sd-scripts), so its module choice (the `preset`), names
(`lora_unet_...`, `lora_te_...`, SDXL `lora_te1_` / `lora_te2_`) and tensors (`.hada_w1_a`,
`.lokr_w1`, `.alpha`...) are LyCORIS's own. Its modules are registered under each model they wrap
(`<model>.lycoris_network`), so the optimizer, gradient clipping, `accelerator.prepare` and eval
mode see them exactly as they see PEFT's LoRA layers. The file written is LyCORIS's state dict with
kohya's header keys (`ss_network_module`, `ss_network_args`), the file ComfyUI and AUTOMATIC1111
load; the export check reloads it with `lycoris.create_lycoris_from_weights` into a fresh base model.

Why AdaPreLoRA refuses these networks: its update is defined for LoRA pairs (B A), and LoHa
((B1 A1) * (B2 A2), a Hadamard product) and LoKr (W1 kron W2) have none. The pair optimizers would
give every tensor their plain-AdamW fallback and the run would be labelled with a method it did not
use, so the configuration is an error naming `--optimizer` and the baselines that do apply.

Two facts of lycoris-lora 4.1.3 handled here: its built-in presets list diffusers'
`TimestepEmbedding` class (for Anima) and its two linears by name, which wraps an SD UNet's
`time_embedding` twice (an AssertionError "duplicated lora name"), so a built-in preset is passed
without that class (the same modules are wrapped, once); and transformers 5's CLIPTextModel has no
`text_model.` level, so the text-encoder modules are renamed to the `lora_te_text_model_...` names
every kohya-format loader expects.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Iterator, Optional, Union

import torch

from ..errors import UserError

# `--network_module` values: our own LoRA (PEFT, both file formats) and LyCORIS (kohya's spelling too).
DEFAULT_NETWORK_MODULE = "networks.lora"
LYCORIS_MODULES = ("lycoris", "lycoris.kohya")
NETWORK_MODULES = (DEFAULT_NETWORK_MODULE, *LYCORIS_MODULES)
# What `ss_network_module` says in the file: sd-scripts' name for a LyCORIS network.
FILE_NETWORK_MODULE = "lycoris.kohya"
ALGOS = ("loha", "lokr")
# Optimizers whose update needs LoRA pairs (B, A): with LoHa / LoKr they would run their fallback.
PAIR_OPTIMIZERS = frozenset({"adaprelora", "adaprelora-sgd", "scaled-gd", "scaled-adamw", "lora-pro", "loraplus",
                             "lora-rite"})
# Where each wrapped model holds its LyCORIS modules.
LYCORIS_ATTR = "lycoris_network"
# `--network_args` keys passed to `lycoris.kohya.create_network`, by type (kohya users' spelling).
_INT_ARGS = ("conv_dim", "factor", "block_size")
_FLOAT_ARGS = ("conv_alpha", "dropout", "rank_dropout", "module_dropout")
_BOOL_ARGS = ("use_tucker", "use_scalar", "decompose_both", "full_matrix", "unbalanced_factorization")
NETWORK_ARGS = ("algo", "preset", *_INT_ARGS, *_FLOAT_ARGS, *_BOOL_ARGS)
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
_LYCO_FLAG = "--network_module lycoris --network_args"


def uses_lycoris(cfg) -> bool:
    """`cfg` asks for a LyCORIS network (`--network_module lycoris` or `lycoris.kohya`)."""
    return getattr(cfg, "network_module", DEFAULT_NETWORK_MODULE) in LYCORIS_MODULES


def parse_network_args(values: Union[None, list, tuple, dict]) -> dict[str, str]:
    """`--network_args` as {key: value-as-written}: a list of `key=value` strings (the command line)
    or a dict (the app, or a config already checked). `UserError` for a malformed or repeated item."""
    if not values:
        return {}
    if isinstance(values, dict):
        items = [(str(k), str(v)) for k, v in values.items()]
    else:
        items = []
        for item in values:
            key, sep, value = str(item).partition("=")
            if not sep or not key.strip() or not value.strip():
                raise UserError(f"--network_args: {item!r} is not key=value (e.g. algo=loha conv_dim=4 factor=8)")
            items.append((key.strip(), value.strip()))
    out: dict[str, str] = {}
    for key, value in items:
        if key in out:
            raise UserError(f"--network_args: {key} is given twice")
        out[key] = value
    return out


def _bool(key: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise UserError(f"--network_args {key}={value}: expected true or false")


def _number(kind, key: str, value: str):
    try:
        return kind(value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise UserError(f"--network_args {key}={value}: expected {what}") from None


def network_kwargs(args: dict[str, str]) -> dict:
    """The typed keyword arguments for `lycoris.kohya.create_network`; `UserError` for an unknown
    key, a value of the wrong type or out of range."""
    out: dict = {}
    for key, value in args.items():
        if key not in NETWORK_ARGS:
            raise UserError(f"--network_args: unknown key {key!r} for LyCORIS; supported: {', '.join(NETWORK_ARGS)} "
                            "(the rank and alpha are --rank and --lora_alpha)")
        if key in _INT_ARGS:
            out[key] = _number(int, key, value)
        elif key in _FLOAT_ARGS:
            out[key] = _number(float, key, value)
        elif key in _BOOL_ARGS:
            out[key] = _bool(key, value)
        else:
            out[key] = value
    algo = out.get("algo", "").lower()
    if algo not in ALGOS:
        given = f"algo={out['algo']}" if "algo" in out else "no algo"
        raise UserError(f"{_LYCO_FLAG}: {given}; this trainer supports algo=loha or algo=lokr (for plain LoRA or "
                        "LoCon use the default --network_module networks.lora with --rank and --conv_rank)")
    out["algo"] = algo
    if out.get("conv_dim", 0) < 0:
        raise UserError(f"--network_args conv_dim must be 0 (no convolutions) or more, got {out['conv_dim']}")
    if "conv_alpha" in out and not out["conv_alpha"] > 0:
        raise UserError(f"--network_args conv_alpha must be positive, got {out['conv_alpha']}")
    factor = out.get("factor", -1)
    if factor != -1 and factor < 1:
        raise UserError(f"--network_args factor must be -1 (automatic) or at least 1, got {factor}")
    if out.get("block_size", 1) < 1:
        raise UserError(f"--network_args block_size must be at least 1, got {out['block_size']}")
    for key in ("dropout", "rank_dropout", "module_dropout"):
        if not 0.0 <= out.get(key, 0.0) < 1.0:
            raise UserError(f"--network_args {key} must be in [0, 1), got {out[key]}")
    if "preset" in out:
        _check_preset(out["preset"])
    return out


def _check_preset(preset: str) -> None:
    from lycoris.config import PRESET

    if preset not in PRESET and not os.path.isfile(preset):
        raise UserError(f"--network_args preset={preset}: neither a built-in LyCORIS preset ({', '.join(PRESET)}) "
                        "nor a preset TOML file")


def check_network_config(cfg) -> None:
    """The checks of `--network_module` / `--network_args` (run by `TrainConfig.validate`, before
    anything loads): a known module, LyCORIS arguments that build a network, no DoRA or `--conv_rank`
    beside a LyCORIS algo, and an optimizer that works without LoRA pairs. Normalises
    `cfg.network_args` to {key: value-as-written}."""
    from adaprelora.factory import canonical_name

    module = cfg.network_module
    if module not in NETWORK_MODULES:
        raise UserError(f"--network_module {module!r} is not one of: {', '.join(NETWORK_MODULES)} "
                        "(networks.lora: LoRA/LoCon, the default; lycoris or lycoris.kohya: LoHa/LoKr)")
    cfg.network_args = parse_network_args(cfg.network_args)
    if not uses_lycoris(cfg):
        if cfg.network_args:
            raise UserError("--network_args are LyCORIS's (algo=loha ...): add --network_module lycoris, or drop them "
                            "(networks.lora takes --rank, --lora_alpha and --lora_dropout)")
        return
    kwargs = network_kwargs(cfg.network_args)
    algo = kwargs["algo"]
    if getattr(cfg, "use_dora", False):
        raise UserError(f"--use_dora is PEFT's DoRA on LoRA (--network_module networks.lora) and cannot be combined "
                        f"with algo={algo}: drop --use_dora or use --network_module networks.lora")
    if getattr(cfg, "conv_rank", None):
        raise UserError(f"--conv_rank is for --network_module networks.lora; with algo={algo} give the convolutions' "
                        "rank as --network_args conv_dim=N (and conv_alpha=A)")
    optimizer = canonical_name(cfg.optimizer)
    if optimizer in PAIR_OPTIMIZERS:
        raise UserError(f"--optimizer {optimizer} updates LoRA pairs (B, A) and algo={algo} has none; choose an "
                        "optimizer for any tensor, e.g. --optimizer adamw (or prodigy, adafactor, schedule-free, "
                        "adamw8bit)")


def _kohya_preset(name: str) -> dict:
    """Built-in preset `name` without diffusers' `TimestepEmbedding` class where the preset also
    names its linears (lycoris-lora 4.1.3 would wrap them twice); other presets unchanged."""
    from lycoris.config import PRESET

    preset = {k: list(v) if isinstance(v, list) else v for k, v in PRESET[name].items()}
    names = preset.get("unet_target_name") or []
    if any(n.startswith("time_embedding.") for n in names):
        preset["unet_target_module"] = [m for m in preset.get("unet_target_module", []) if m != "TimestepEmbedding"]
    return preset


@contextlib.contextmanager
def _quiet_lycoris() -> Iterator[None]:
    """LyCORIS logs every module choice at INFO (and unmatched preset classes as warnings)."""
    from lycoris.logging import logger

    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _file_name(lora_name: str, model: torch.nn.Module) -> str:
    """A LyCORIS module's name in the file: text-encoder names with the `text_model_` level that
    kohya-format loaders expect (transformers 5's CLIPTextModel has none)."""
    for prefix in _TE_PREFIXES:
        if lora_name.startswith(prefix) and not hasattr(model, "text_model"):
            rest = lora_name[len(prefix):]
            return lora_name if rest.startswith("text_model_") else f"{prefix}text_model_{rest}"
    return lora_name


def _model_name(lora_name: str, model: torch.nn.Module) -> str:
    """The inverse of `_file_name` for `model`: the name `model.named_modules()` gives."""
    for prefix in _TE_PREFIXES:
        if lora_name.startswith(prefix + "text_model_") and not hasattr(model, "text_model"):
            return prefix + lora_name[len(prefix + "text_model_"):]
    return lora_name


def create_lycoris_network(cfg, unet: torch.nn.Module, text_encoders=()) -> torch.nn.Module:
    """LyCORIS's kohya network for `unet` (and `text_encoders`, SD: one, SDXL: two), applied to them
    and registered under each as `lycoris_network`: --rank and --lora_alpha are kohya's
    network_dim / network_alpha, --network_args the rest. Returns the `LycorisNetworkKohya`."""
    import lycoris.kohya
    from lycoris.config import PRESET

    args = parse_network_args(cfg.network_args)
    kwargs = network_kwargs(args)
    kwargs.setdefault("dropout", float(cfg.lora_dropout))
    preset = kwargs.pop("preset", "full")
    encoders = list(text_encoders)
    te_arg = None if not encoders else (encoders[0] if len(encoders) == 1 else encoders)
    key = f"adaprelora-{preset}" if preset in PRESET else preset
    with _quiet_lycoris():
        if preset in PRESET:
            PRESET[key] = _kohya_preset(preset)
        try:
            network = lycoris.kohya.create_network(1.0, cfg.rank, cfg.effective_lora_alpha, None, te_arg, unet,
                                                   warn_on_unmatched=False, preset=key, **kwargs)
        except (AssertionError, KeyError, ValueError, RuntimeError) as err:
            raise UserError(f"{_LYCO_FLAG} {' '.join(f'{k}={v}' for k, v in args.items())}: LyCORIS could not "
                            f"build the network: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        finally:
            PRESET.pop(f"adaprelora-{preset}", None)
        if not network.unet_loras:  # e.g. attn-only: kohya's CrossAttention class, not in diffusers' UNet
            raise UserError(f"{_LYCO_FLAG} preset={preset}: the preset wraps no module of this UNet; use full, "
                            "full-lin, attn-mlp or unet-transformer-only")
        groups = [(unet, network.unet_loras)] + [
            (encoder, [lora for lora in network.text_encoder_loras if _owner(lora, encoders) is encoder])
            for encoder in encoders]
        for model, loras in groups:
            for lora in loras:
                lora.lora_name = _file_name(lora.lora_name, model)
        network.apply_to(te_arg, unet, apply_text_encoder=bool(encoders), apply_unet=True)
    for model, loras in groups:
        if loras:
            model.add_module(LYCORIS_ATTR, torch.nn.ModuleDict({lora.lora_name: lora for lora in loras}))
    network.requires_grad_(True)
    network.to(device=next(unet.parameters()).device, dtype=torch.float32)
    return network


def _owner(lora, encoders: list) -> Optional[torch.nn.Module]:
    """The text encoder whose module `lora` wraps."""
    target = lora.org_module[0]
    for encoder in encoders:
        if any(module is target for module in encoder.modules()):
            return encoder
    return None


def lycoris_state_dict(models) -> dict[str, torch.Tensor]:
    """The LyCORIS tensors of the wrapped models (`unet`, then text encoders), under the file's names."""
    out: dict[str, torch.Tensor] = {}
    for model in models:
        holder = getattr(model, LYCORIS_ATTR, None)
        if holder is not None:
            out.update({k: v.detach() for k, v in holder.state_dict().items()})
    return out


def load_lycoris_state_dict(models, state: dict[str, torch.Tensor]) -> None:
    """Load tensors written by `lycoris_state_dict` back into the wrapped models (checkpoints):
    every tensor of every model must be there, and nothing else."""
    seen = set()
    for model in models:
        holder = getattr(model, LYCORIS_ATTR, None)
        if holder is None:
            continue
        own = {k: v for k, v in state.items() if k.split(".", 1)[0] in holder}
        holder.load_state_dict(own, strict=True)
        seen.update(own)
    extra = sorted(set(state) - seen)
    if extra:
        raise ValueError(f"checkpoint has LyCORIS tensors the network does not: {extra[:3]}")


def network_metadata(cfg) -> dict[str, str]:
    """kohya's header keys for a LyCORIS network (sd-scripts writes these for lycoris.kohya)."""
    args = parse_network_args(cfg.network_args)
    dropout = args.get("dropout", str(cfg.lora_dropout))
    return {"ss_network_module": FILE_NETWORK_MODULE, "ss_network_dim": str(cfg.rank),
            "ss_network_alpha": str(cfg.effective_lora_alpha), "ss_network_dropout": dropout,
            "ss_network_args": json.dumps(args)}


def save_lycoris_file(path: str, models, metadata: Optional[dict[str, str]] = None) -> str:
    """Write the wrapped models' LyCORIS tensors to `path` (fp32, the trained values) with `metadata`
    and kohya's content hashes in the header, under a temporary name first. Returns `path`."""
    from safetensors.torch import save_file

    from .family import detect_family
    from .kohya_metadata import kohya_hashes, modelspec_architecture

    models = list(models)
    tensors = {k: v.to("cpu", torch.float32).contiguous() for k, v in lycoris_state_dict(models).items()}
    header = {"format": "pt", "modelspec.architecture": modelspec_architecture(detect_family(unet_config=models[0].config))}
    header.update(metadata or {})
    header["sshs_model_hash"], header["sshs_legacy_hash"] = kohya_hashes(tensors, header)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=header)
    os.replace(tmp, path)
    return path


def no_diffusers_file_reason(cfg) -> str:
    """One line for the run summary: why a LyCORIS run has no diffusers-format file."""
    algo = parse_network_args(cfg.network_args).get("algo", "")
    return (f"no diffusers-format file: diffusers' load_lora_weights reads LoRA only, and {algo} is LyCORIS; "
            "the LyCORIS file loads in ComfyUI, AUTOMATIC1111 or with lycoris.create_lycoris_from_weights")


def save_lycoris_outputs(cfg, view, metadata: dict[str, str]) -> dict[str, str]:
    """The run's LyCORIS file `<output_name>.safetensors` (the trained models of `view`, a
    `DreamBoothModels`) with kohya's header; returns the outputs entries: {"kohya": path, "note": ...}."""
    meta = dict(metadata)
    meta.update(network_metadata(cfg))
    path = os.path.join(cfg.output_dir, f"{cfg.effective_output_name}.safetensors")
    save_lycoris_file(path, [view.unet, *view.trained_text_encoders], meta)
    return {"kohya": path, "note": no_diffusers_file_reason(cfg)}


def reload_lycoris_file(path: str, unet: torch.nn.Module, text_encoders=()) -> list:
    """Apply the LyCORIS file at `path` to a fresh `unet` (and `text_encoders` in the pipeline's
    order) with `lycoris.create_lycoris_from_weights`, one network per model, as a kohya-format
    loader would. Returns the networks; `ValueError` if a tensor of the file found no module."""
    from lycoris import LycorisNetwork, create_lycoris_from_weights
    from safetensors.torch import load_file

    state = load_file(path)
    encoders = list(text_encoders)
    te_prefixes = ["lora_te"] if len(encoders) == 1 else [f"lora_te{i + 1}" for i in range(len(encoders))]
    networks, used = [], set()
    saved_prefix = LycorisNetwork.LORA_PREFIX
    try:
        with _quiet_lycoris():
            for prefix, model in [("lora_unet", unet), *zip(te_prefixes, encoders)]:
                own = {_model_name(k, model): v for k, v in state.items() if k.startswith(prefix + "_")}
                if not own:
                    continue
                LycorisNetwork.LORA_PREFIX = prefix
                network, _ = create_lycoris_from_weights(1.0, path, model, weights_sd=own)
                network.apply_to()
                network.load_state_dict(own, strict=False)
                network.to(device=next(model.parameters()).device).eval()
                loaded = {k for k in own for lora in network.loras if k.startswith(lora.lora_name + ".")}
                used.update(k for k, v in state.items() if _model_name(k, model) in loaded)
                networks.append(network)
    finally:
        LycorisNetwork.LORA_PREFIX = saved_prefix
    missing = sorted(set(state) - used)
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) of the file found no module, e.g. {missing[0]!r}")
    return networks


def verify_lycoris_file(cfg, path: str, models, *, text_encoder_trained: bool):
    """The export check of a LyCORIS run: the file, reloaded with `create_lycoris_from_weights` into
    a fresh copy of the base model, must reproduce the trained UNet's (and text encoders') output on
    the fixed input `verify` uses. `models` is the run's unwrapped `DreamBoothModels`. Returns an
    `ExportCheck` with one "kohya" entry; never raises for a bad file."""
    from .verify import verify_exports

    return verify_exports(cfg, {"kohya": path}, models.unet, models.text_encoders, models.tokenizers,
                          dtype=models.weight_dtype, text_encoder_trained=text_encoder_trained,
                          load=lambda pipe, kind, file, encoders: reload_lycoris_file(file, pipe.unet, encoders))

__all__ = ["ALGOS", "DEFAULT_NETWORK_MODULE", "LYCORIS_ATTR", "NETWORK_ARGS", "NETWORK_MODULES", "PAIR_OPTIMIZERS",
           "check_network_config", "create_lycoris_network", "load_lycoris_state_dict", "lycoris_state_dict",
           "network_kwargs", "network_metadata", "no_diffusers_file_reason", "parse_network_args",
           "reload_lycoris_file", "save_lycoris_file", "save_lycoris_outputs", "uses_lycoris", "verify_lycoris_file"]
