"""The Stable Diffusion (1.x/2.x or SDXL) parts DreamBooth trains: loading them, adding LoRA.

Kept apart from the training loop so that what gets loaded (and in which dtype) can be read in one
place: frozen weights load directly in the mixed-precision dtype, while the LoRA tensors added on
top stay fp32 so that they, and the optimizer state, train at full precision. Loading problems
become one-line `UserError`s naming `--pretrained_model_name_or_path`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..errors import UserError, first_line
from .config import TrainConfig
from .family import ModelFamily, detect_family

# Where LoRA goes with `--lora_layers attn` (the default): the attention projections of the UNet and
# of the CLIP text encoder(s).
UNET_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
# attn-ff and all-linear: kohya's text-encoder target, CLIPAttention and CLIPMLP whole.
TEXT_ENCODER_FF_TARGET_MODULES = TEXT_ENCODER_TARGET_MODULES + ["fc1", "fc2"]
# kohya's networks/lora.py: every Linear and 1x1 Conv2d inside these UNet classes (attn-ff)...
KOHYA_UNET_CLASSES = ("Transformer2DModel",)
# ...and, with conv_dim (`--conv_rank`), inside these too: their 3x3 convolutions at conv_dim /
# conv_alpha, their Linear (time_emb_proj) and 1x1 convolutions (conv_shortcut) at the LoRA rank.
KOHYA_UNET_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# The text encoders' names in a pipeline (and in diffusers' LoRA files), in order.
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")


def as_list(modules: Union[None, object, Sequence]) -> list:
    """`None`, one model or a sequence of models (as diffusers' `cast_training_params` takes them)
    as a list without the Nones."""
    if modules is None:
        return []
    if isinstance(modules, (list, tuple)):
        return [m for m in modules if m is not None]
    return [modules]


@dataclass(frozen=True)
class DreamBoothModels:
    """The pipeline parts one run uses (the VAE, text encoders and UNet on the device), passed whole.

    `text_encoders` and `tokenizers` hold one entry per text encoder, in the pipeline's order (SD:
    CLIP; SDXL: CLIP ViT-L, then OpenCLIP ViT-bigG with projection). `trained` lists the models that
    carry LoRA, in the order accelerate prepares them; after `accelerator.prepare` they are wrapped,
    and `unwrapped(accelerator)` is the view that saving, sampling and the export check use.
    """

    family: ModelFamily
    tokenizers: tuple
    text_encoders: tuple
    noise_scheduler: object
    vae: torch.nn.Module
    unet: torch.nn.Module
    weight_dtype: torch.dtype
    train_text_encoder: bool = False

    @property
    def sdxl(self) -> bool:
        return self.family.sdxl

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def trained_text_encoders(self) -> tuple:
        """The text encoders with LoRA (`--train_text_encoder`), else none."""
        return self.text_encoders if self.train_text_encoder else ()

    def named_trained(self) -> dict[str, torch.nn.Module]:
        """{"unet": ..., "text_encoder": ..., "text_encoder_2": ...} for the models with LoRA."""
        return {"unet": self.unet, **dict(zip(TEXT_ENCODER_NAMES, self.trained_text_encoders))}

    @property
    def trained(self) -> list[torch.nn.Module]:
        return list(self.named_trained().values())

    def with_trained(self, modules: Sequence[torch.nn.Module]) -> "DreamBoothModels":
        """These models with `trained` replaced by `modules` (same order), e.g. accelerate's wrappers."""
        unet, *encoders = modules
        return dataclasses.replace(self, unet=unet,
                                   text_encoders=tuple(encoders) + self.text_encoders[len(encoders):])

    def unwrapped(self, accelerator) -> "DreamBoothModels":
        """The view without accelerate's wrappers (DDP, compiled models), for saving and sampling."""
        unwrap = accelerator.unwrap_model
        return dataclasses.replace(self, unet=unwrap(self.unet),
                                   text_encoders=tuple(unwrap(m) for m in self.text_encoders))

    def pipeline(self, scheduler):
        """A pipeline of the family on these parts (no safety checker, no watermark), for sampling."""
        encoders = dict(zip(TEXT_ENCODER_NAMES, self.text_encoders))
        tokenizers = dict(zip(("tokenizer", "tokenizer_2"), self.tokenizers))
        extra = (dict(add_watermarker=False) if self.sdxl
                 else dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False))
        return self.family.pipeline_class()(vae=self.vae, unet=self.unet, scheduler=scheduler, **encoders,
                                            **tokenizers, **extra)


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen weights for accelerate's `mixed_precision` setting."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _load_pretrained(cfg: TrainConfig, cls, subfolder: Optional[str], path: Optional[str] = None,
                     flag: str = "--pretrained_model_name_or_path", **kw):
    path = path or cfg.pretrained_model_name_or_path
    try:
        return cls.from_pretrained(path, subfolder=subfolder, revision=cfg.revision, **kw)
    except (OSError, ValueError, EnvironmentError) as err:
        raise UserError(f"{flag}: cannot load {subfolder or 'the model'} of {path!r}: {first_line(err)}") from None


def _load_tokenizer(cfg: TrainConfig, subfolder: str):
    from transformers import CLIPTokenizer

    tokenizer = _load_pretrained(cfg, CLIPTokenizer, subfolder)
    if len(tokenizer) < 256:  # offline Hub lookups can return an almost empty tokenizer
        raise UserError(f"--pretrained_model_name_or_path: the {subfolder} of {cfg.pretrained_model_name_or_path!r} "
                        f"did not load (only {len(tokenizer)} tokens: offline without a cached copy, or not a "
                        "Stable Diffusion model?)")
    return tokenizer


def _load_vae(cfg: TrainConfig, dtype: torch.dtype, sdxl: bool, variant: dict):
    """The model's VAE or `--pretrained_vae_model_name_or_path`. SDXL's own VAE overflows in fp16,
    so it stays fp32 when its config asks (`force_upcast`), as diffusers' SDXL script keeps it."""
    from diffusers import AutoencoderKL

    if cfg.pretrained_vae_model_name_or_path:
        return _load_pretrained(cfg, AutoencoderKL, None, path=cfg.pretrained_vae_model_name_or_path,
                                flag="--pretrained_vae_model_name_or_path", dtype=dtype)
    vae = _load_pretrained(cfg, AutoencoderKL, "vae", dtype=dtype, **variant)
    if sdxl and dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)
    return vae


def load_models(cfg: TrainConfig, accelerator, family: ModelFamily) -> DreamBoothModels:
    """Load tokenizer(s), noise scheduler, text encoder(s), VAE and UNet, frozen and on the device,
    with xformers attention and gradient checkpointing as `cfg` asks; SDXL (`family`) adds its
    second tokenizer and text encoder. The family is then confirmed from the loaded parts' configs
    (the files' header keys need SD 2.x and v-prediction too)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = cfg.pretrained_model_name_or_path
    if os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path):
        if not os.path.isdir(path):
            raise UserError(f"--pretrained_model_name_or_path: folder {path!r} does not exist")
        if not os.path.isdir(os.path.join(path, "unet")):
            raise UserError(f"--pretrained_model_name_or_path: {path!r} is not a Stable Diffusion pipeline "
                            "folder (no unet/ subfolder)")
    encoder_classes = (CLIPTextModel, CLIPTextModelWithProjection)[: 2 if family.sdxl else 1]
    tokenizers = tuple(_load_tokenizer(cfg, name.replace("text_encoder", "tokenizer"))
                       for name in TEXT_ENCODER_NAMES[: len(encoder_classes)])
    noise_scheduler = _load_pretrained(cfg, DDPMScheduler, "scheduler")
    variant = {"variant": cfg.variant} if cfg.variant else {}
    # Frozen weights load directly in the mixed-precision dtype (modules the model wants in
    # fp32 stay fp32); the LoRA tensors added later are kept in fp32.
    dtype = weight_dtype(accelerator.mixed_precision)
    text_encoders = tuple(_load_pretrained(cfg, cls, name, dtype=dtype, **variant)
                          for cls, name in zip(encoder_classes, TEXT_ENCODER_NAMES))
    vae = _load_vae(cfg, dtype, family.sdxl, variant)
    unet = _load_pretrained(cfg, UNet2DConditionModel, "unet", dtype=dtype, **variant)
    for model in (vae, *text_encoders, unet):
        model.requires_grad_(False)
        model.to(accelerator.device)

    if cfg.enable_xformers_memory_efficient_attention:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as err:
            raise UserError(f"--enable_xformers_memory_efficient_attention: {first_line(err)}") from None
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in (text_encoders if cfg.train_text_encoder else []):
            if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5.2x
                encoder.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
    # The loaded parts' configs settle SD 2.x and v-prediction (the files' header keys); SDXL, which
    # decided what to load, stays as it was found from the same files.
    found = detect_family(path, cfg.revision, unet_config=unet.config, text_encoder_config=text_encoders[0].config,
                          prediction_type=noise_scheduler.config.prediction_type)
    family = dataclasses.replace(found, sdxl=family.sdxl)
    return DreamBoothModels(family=family, tokenizers=tokenizers, text_encoders=text_encoders,
                            noise_scheduler=noise_scheduler, vae=vae, unet=unet, weight_dtype=dtype,
                            train_text_encoder=cfg.train_text_encoder)


def _is_linear_or_1x1(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Conv2d)
                                                   and tuple(module.kernel_size) == (1, 1))


def _is_conv(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def unet_lora_targets(unet: torch.nn.Module, lora_layers: str = "attn",
                      conv: bool = False) -> tuple[list[str], list[str]]:
    """The UNet modules `--lora_layers` (and `--conv_rank`, `conv=True`) adapt, as
    (targets, the 3x3 convolutions among them).

    attn: `UNET_TARGET_MODULES` (names matched at the end, as PEFT does). attn-ff: kohya's default,
    every Linear and 1x1 Conv2d inside a Transformer2DModel (proj_in, the attention projections,
    ff.net.0.proj, ff.net.2, proj_out). all-linear: attn-ff plus every other Linear of the UNet (the
    ResNets' time_emb_proj, the time and SDXL's added-condition embeddings). With `conv`, kohya's
    LoCon: inside ResnetBlock2D / Downsample2D / Upsample2D, the 3x3 convolutions (returned second,
    for the conv rank) and the Linear and 1x1 ones. Full module names otherwise, in model order.
    """
    if lora_layers == "attn":
        if conv:
            raise ValueError("LoCon's convolutions extend attn-ff or all-linear, not attn")
        return list(UNET_TARGET_MODULES), []
    targets: dict[str, None] = {}
    convs: list[str] = []
    for name, module in unet.named_modules():
        kind = type(module).__name__
        if kind in KOHYA_UNET_CLASSES or (conv and kind in KOHYA_UNET_CONV_CLASSES):
            for child_name, child in module.named_modules():
                full = f"{name}.{child_name}" if child_name else name
                if _is_linear_or_1x1(child):
                    targets[full] = None
                elif kind in KOHYA_UNET_CONV_CLASSES and _is_conv(child):
                    targets[full] = None
                    convs.append(full)
        elif lora_layers == "all-linear" and isinstance(module, torch.nn.Linear):
            targets[name] = None
    order = {name: i for i, (name, _) in enumerate(unet.named_modules())}
    return sorted(targets, key=order.__getitem__), convs


def text_encoder_lora_targets(lora_layers: str = "attn") -> list[str]:
    """The text-encoder modules `--lora_layers` adapts (PEFT names, matched at the end)."""
    return list(TEXT_ENCODER_TARGET_MODULES if lora_layers == "attn" else TEXT_ENCODER_FF_TARGET_MODULES)


def lora_configs(cfg: TrainConfig, unet: torch.nn.Module) -> tuple:
    """(the UNet's LoraConfig, the text encoders' one) for `cfg`'s rank, alpha, layers, conv rank
    and DoRA: the 3x3 convolutions get `--conv_rank` / conv alpha through PEFT's
    rank_pattern / alpha_pattern (keyed by full module name, as diffusers writes them)."""
    from peft import LoraConfig

    common = dict(r=cfg.rank, lora_alpha=cfg.effective_lora_alpha, lora_dropout=cfg.lora_dropout,
                  init_lora_weights="gaussian", use_dora=bool(cfg.use_dora))
    targets, convs = unet_lora_targets(unet, cfg.lora_layers, cfg.conv_rank is not None)
    if cfg.conv_rank is not None and not convs:
        raise UserError("--conv_rank: the UNet has no 3x3 convolution in a ResnetBlock2D, Downsample2D or "
                        "Upsample2D to adapt; leave --conv_rank out for this model")
    patterns = {}
    if convs:
        patterns = dict(rank_pattern={n: cfg.conv_rank for n in convs},
                        alpha_pattern={n: cfg.effective_conv_alpha for n in convs})
    unet_config = LoraConfig(target_modules=targets, **patterns, **common)
    return unet_config, LoraConfig(target_modules=text_encoder_lora_targets(cfg.lora_layers), **common)


def add_lora_adapters(cfg: TrainConfig, models: DreamBoothModels) -> None:
    """Add the "default" LoRA adapter to the UNet (and the text encoder(s) with
    `--train_text_encoder`) on the layers `--lora_layers` / `--conv_rank` name (`lora_configs`);
    under mixed precision the LoRA tensors (DoRA's magnitudes too) are cast to fp32."""
    from diffusers.training_utils import cast_training_params

    unet_config, encoder_config = lora_configs(cfg, models.unet)
    models.unet.add_adapter(unet_config)
    for encoder in models.trained_text_encoders:
        encoder.add_adapter(dataclasses.replace(encoder_config))
    if models.weight_dtype != torch.float32:
        # Only the LoRA tensors are trained: keep them (and so the optimizer state) in fp32.
        cast_training_params(models.trained, dtype=torch.float32)


__all__ = ["DreamBoothModels", "KOHYA_UNET_CLASSES", "KOHYA_UNET_CONV_CLASSES", "TEXT_ENCODER_FF_TARGET_MODULES",
           "TEXT_ENCODER_NAMES", "TEXT_ENCODER_TARGET_MODULES", "UNET_TARGET_MODULES", "add_lora_adapters",
           "as_list", "lora_configs", "load_models", "text_encoder_lora_targets", "unet_lora_targets",
           "weight_dtype"]
