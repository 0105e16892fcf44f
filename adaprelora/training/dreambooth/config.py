"""`TrainConfig`: every setting of a DreamBooth LoRA run, named after diffusers' flags.

`train_dreambooth.py` declares its flags from these fields (their defaults live here only) and
builds one with `TrainConfig.from_namespace`; the app builds one from its form (`TrainConfig(...)`).
`validate()` runs the checks that involve several fields; each problem is a `UserError` whose
message names the flags involved.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

from ..checkpoints import check_output_dir
from ..errors import UserError, check_number_fields, check_seed
from ..options import check_lr_scheduler, check_optimizer_args, config_from_namespace

MIXED_PRECISION = ("no", "fp16", "bf16")
PRIOR_GENERATION_PRECISION = ("no", "fp32", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "none")
INTERPOLATION_MODES = ("lanczos", "bicubic", "bilinear", "nearest", "box", "hamming")
# Which layers carry LoRA (`--lora_layers`, see models.unet_lora_targets)
LORA_LAYERS = ("attn", "attn-ff", "all-linear")


def default_report_to() -> str:
    """"tensorboard" when it is installed (diffusers' default), else "none"."""
    return "tensorboard" if importlib.util.find_spec("tensorboard") is not None else "none"


@dataclass
class TrainConfig:
    """Settings of one DreamBooth LoRA run. Field names are the CLI flags without `--`.

    Images come from `instance_data_dir` (a folder), or from `instance_images` (a list of file
    paths, as the app passes uploads) with optional `instance_captions` {path: caption}. A caption
    found for an image (in `instance_captions` or in a sidecar `<image>.txt`) replaces
    `instance_prompt` for that image.
    """

    # Model
    pretrained_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    variant: Optional[str] = None
    pretrained_vae_model_name_or_path: Optional[str] = None  # SDXL: e.g. an fp16-safe VAE
    # Data
    instance_data_dir: Optional[str] = None
    instance_images: Optional[list[str]] = None
    instance_captions: Optional[dict[str, str]] = None
    instance_prompt: Optional[str] = None
    class_data_dir: Optional[str] = None
    class_prompt: Optional[str] = None
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    # Caption dropout (kohya's name): the share of steps an image is trained with the empty prompt.
    # On the class images it holds the unconditional prediction, which classifier-free guidance
    # subtracts, to the base model's; without it a LoRA moves that prediction towards its subject
    # and guidance then pushes every prompt away from the subject (README, "Caption dropout").
    caption_dropout_rate: float = 0.0
    class_caption_dropout_rate: float = 0.0
    # kohya dataset configs and caption shuffling (dataset_config.py, captions.py): a TOML of image
    # folders (subsets) with their repeats, captions and regularisation images replaces the
    # instance/class flags; tag shuffling after the first keep_tokens tags, as kohya does it.
    dataset_config: Optional[str] = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    sample_batch_size: int = 4
    prior_generation_precision: Optional[str] = None
    class_inference_steps: int = 50
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    image_interpolation_mode: str = "lanczos"
    # Aspect-ratio buckets (kohya's flags)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    # Caching
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    # SDXL conditioning at sampling time (validation and class images)
    crops_coords_top_left_h: Optional[int] = None
    crops_coords_top_left_w: Optional[int] = None
    dataloader_num_workers: int = 0
    # Output
    output_dir: str = "lora-dreambooth-model"
    output_name: Optional[str] = None
    logging_dir: str = "logs"
    report_to: str = field(default_factory=default_report_to)
    seed: Optional[int] = None
    # LoRA
    rank: int = 4
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    train_text_encoder: bool = False
    # Which layers (models.unet_lora_targets): kohya's presets, LoCon's 3x3 convolutions (kohya's
    # conv_dim / conv_alpha; conv_alpha 1 when not given, as kohya) and PEFT's DoRA
    lora_layers: str = "attn"
    conv_rank: Optional[int] = None
    conv_alpha: Optional[float] = None
    use_dora: bool = False
    # LyCORIS (lycoris_network.py): --network_module lycoris (or kohya's lycoris.kohya) with
    # --network_args algo=loha|lokr ... as kohya users write them; networks.lora is our PEFT LoRA
    network_module: str = "networks.lora"
    network_args: Optional[Union[list, dict]] = None
    # Optimisation
    # AdamW: no AdaPreLoRA variant beat it on the quality suites (docs/results.md); --optimizer adaprelora
    optimizer: str = "adamw"
    optimizer_args: dict = field(default_factory=dict)
    learning_rate: float = 5e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    max_grad_norm: float = 1.0
    train_batch_size: int = 4
    num_train_epochs: int = 1
    max_train_steps: Optional[int] = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: Optional[str] = None
    allow_tf32: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    # Checkpoints
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None
    # Validation
    validation_prompt: Optional[Union[str, list[str]]] = None
    num_validation_images: int = 4
    validation_steps: Optional[int] = 100
    validation_inference_steps: int = 25
    validation_width: Optional[int] = None
    validation_height: Optional[int] = None
    # Validation loss: the denoising loss on held-out images at fixed timesteps and fixed noise
    # (validation_loss.py), so the same weights always score the same. The held-out images are a
    # share of the instance images (drawn by --seed) or a folder of their own, never both.
    validation_split: Optional[float] = None
    validation_loss_data_dir: Optional[str] = None
    validation_loss_steps: int = 100
    # Export
    skip_export_check: bool = False
    # EMA of the LoRA weights (training/ema.py): samples, validation loss and the files come from it
    use_ema: bool = False
    ema_decay: float = 0.999
    ema_warmup: str = "ratio"
    ema_update_after_step: int = 0
    ema_cpu: bool = False
    ema_save_raw: bool = False

    # Masked loss (kohya's flags, masks.py): the loss weighed per pixel by a mask image per instance
    # image (same file stem in conditioning_data_dir) or by the image's own alpha channel
    masked_loss: bool = False
    conditioning_data_dir: Optional[str] = None
    alpha_mask: bool = False

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "TrainConfig":
        """Build a config from the parsed flags; an attribute with no field raises `TypeError`."""
        return config_from_namespace(cls, args)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def tracker_config(self) -> dict:
        """Settings for the tracker (TensorBoard hparams accept only scalars and strings)."""
        out = {}
        for key, value in self.to_dict().items():
            if isinstance(value, (int, float, str, bool)):
                out[key] = value
            elif value is not None and key not in ("instance_images", "instance_captions"):
                out[key] = str(value)
        return out

    # Derived values -------------------------------------------------------------------------
    @property
    def validation_prompts(self) -> list[str]:
        """`validation_prompt` as a list (one or several prompts; empty when not set)."""
        if not self.validation_prompt:
            return []
        if isinstance(self.validation_prompt, str):
            return [self.validation_prompt]
        return [p for p in self.validation_prompt if p]

    @property
    def validation_size(self) -> tuple[int, int]:
        """(width, height) of validation images: `--validation_width/--validation_height`, else
        `--resolution` for the side not given."""
        return (self.validation_width or self.resolution, self.validation_height or self.resolution)

    @property
    def uses_latent_cache(self) -> bool:
        """`--cache_latents`, or `--cache_latents_to_disk` (which implies it, as in kohya)."""
        return bool(self.cache_latents or self.cache_latents_to_disk)

    @property
    def effective_lora_alpha(self) -> float:
        """`--lora_alpha`, or `--rank` when not given (scaling 1, diffusers' behaviour)."""
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def effective_conv_alpha(self) -> Optional[float]:
        """`--conv_alpha`, or 1 with `--conv_rank` (kohya's default for conv_alpha); None without LoCon."""
        if self.conv_rank is None:
            return None
        return float(1.0 if self.conv_alpha is None else self.conv_alpha)

    @property
    def effective_output_name(self) -> str:
        """Stem of the kohya file: `--output_name`, else the output folder's name."""
        if self.output_name:
            return self.output_name
        name = os.path.basename(os.path.normpath(os.path.abspath(self.output_dir)))
        return name or "lora"

    # Checks ---------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Check values and combinations of fields; raise `UserError` naming the flags.

        Harmless misuse only warns (`warnings.warn`), as diffusers does. Returns self.
        The images themselves are checked when the dataset is built.
        """
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise UserError(message)

        need(bool(self.pretrained_model_name_or_path), "--pretrained_model_name_or_path is required")
        check_number_fields(self)
        check_seed(self.seed)
        check_output_dir(self.output_dir)
        self._validate_dataset_config(need)
        need(
            bool(self.instance_data_dir) or bool(self.instance_images) or bool(self.dataset_config),
            "--instance_data_dir is required (a folder of PNG/JPEG/WebP images), or --dataset_config",
        )
        if self.instance_data_dir and not self.instance_images and not os.path.isdir(self.instance_data_dir):
            what = "is a file, not a folder" if os.path.exists(self.instance_data_dir) else "does not exist"
            raise UserError(f"--instance_data_dir: folder {self.instance_data_dir!r} {what}")
        need(self.resolution > 0 and self.resolution % 8 == 0,
             f"--resolution must be a positive multiple of 8, got {self.resolution}")
        need(self.rank >= 1, f"--rank must be at least 1, got {self.rank}")
        need(self.lora_alpha is None or self.lora_alpha > 0, f"--lora_alpha must be positive, got {self.lora_alpha}")
        need(0.0 <= self.lora_dropout < 1.0, f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(self.learning_rate > 0, f"--learning_rate must be positive, got {self.learning_rate}")
        need(self.train_batch_size >= 1, f"--train_batch_size must be at least 1, got {self.train_batch_size}")
        need(self.sample_batch_size >= 1, f"--sample_batch_size must be at least 1, got {self.sample_batch_size}")
        need(self.gradient_accumulation_steps >= 1,
             f"--gradient_accumulation_steps must be at least 1, got {self.gradient_accumulation_steps}")
        need(self.max_train_steps is None or self.max_train_steps >= 1,
             f"--max_train_steps must be at least 1, got {self.max_train_steps}")
        need(self.num_train_epochs >= 1, f"--num_train_epochs must be at least 1, got {self.num_train_epochs}")
        need(self.checkpointing_steps >= 1, f"--checkpointing_steps must be at least 1, got {self.checkpointing_steps}")
        need(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
             f"--checkpoints_total_limit must be at least 1, got {self.checkpoints_total_limit}")
        need(self.validation_steps is None or self.validation_steps >= 1,
             f"--validation_steps must be at least 1, got {self.validation_steps}")
        need(self.num_validation_images >= 0,
             f"--num_validation_images must be 0 or more, got {self.num_validation_images}")
        need(self.validation_inference_steps >= 1,
             f"--validation_inference_steps must be at least 1, got {self.validation_inference_steps}")
        self._validate_validation_loss(need)
        need(self.snr_gamma is None or self.snr_gamma > 0, f"--snr_gamma must be positive, got {self.snr_gamma}")
        need(self.noise_offset >= 0, f"--noise_offset must be 0 or more, got {self.noise_offset}")
        need(self.max_grad_norm >= 0, f"--max_grad_norm must be 0 (off) or more, got {self.max_grad_norm}")
        need(self.prior_loss_weight >= 0, f"--prior_loss_weight must be 0 or more, got {self.prior_loss_weight}")
        for flag in ("caption_dropout_rate", "class_caption_dropout_rate"):
            rate = getattr(self, flag)
            need(0 <= rate <= 1, f"--{flag} must be between 0 and 1, got {rate}")
        check_lr_scheduler(self.lr_scheduler)
        need(self.mixed_precision in (None,) + MIXED_PRECISION,
             f"--mixed_precision {self.mixed_precision!r} is not one of: {', '.join(MIXED_PRECISION)}")
        need(self.image_interpolation_mode in INTERPOLATION_MODES,
             f"--image_interpolation_mode {self.image_interpolation_mode!r} is not one of: "
             f"{', '.join(INTERPOLATION_MODES)}")
        need(self.report_to in REPORT_TO, f"--report_to {self.report_to!r} is not one of: {', '.join(REPORT_TO)}")
        if self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise UserError("--report_to tensorboard needs tensorboard: `pip install tensorboard` (or --report_to none)")
        if self.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
            raise UserError("--report_to wandb needs wandb: `pip install wandb` (or --report_to none)")
        if self.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
            raise UserError(
                "--enable_xformers_memory_efficient_attention needs xformers: `pip install xformers` "
                "(PyTorch's scaled-dot-product attention is used without the flag)"
            )

        check_optimizer_args(self.optimizer, self.optimizer_args)

        if self.output_name is not None:
            need(bool(self.output_name.strip()) and os.sep not in self.output_name and "/" not in self.output_name,
                 f"--output_name must be a file name without folders, got {self.output_name!r}")
            need(self.output_name.removesuffix(".safetensors") != "pytorch_lora_weights",
                 "--output_name pytorch_lora_weights would overwrite the diffusers file; choose another name")
            self.output_name = self.output_name.removesuffix(".safetensors")

        if self.with_prior_preservation and not self.dataset_config:
            need(bool(self.class_data_dir), "--with_prior_preservation needs --class_data_dir (a folder for class images)")
            need(bool(self.class_prompt), "--with_prior_preservation needs --class_prompt (e.g. 'a photo of a dog')")
            need(self.class_inference_steps >= 1,
                 f"--class_inference_steps must be at least 1, got {self.class_inference_steps}")
            need(self.num_class_images >= 1,
                 f"--num_class_images must be at least 1, got {self.num_class_images}")
            check_output_dir(self.class_data_dir, "--class_data_dir")  # generated class images go there
        else:
            if self.class_data_dir:
                warnings.warn("You need not use --class_data_dir without --with_prior_preservation.")
            if self.class_prompt:
                warnings.warn("You need not use --class_prompt without --with_prior_preservation.")

        self._validate_buckets_and_cache(need)
        self._validate_layers(need)
        self._validate_lycoris(need)
        self._validate_masks(need)
        self._validate_ema(need)

        if self.instance_captions:
            unknown = set(self.instance_captions) - set(self.instance_images or [])
            need(not unknown, f"instance_captions names images not in instance_images: {sorted(unknown)[:3]}")
        if self.validation_prompts and self.num_validation_images == 0:
            warnings.warn("--validation_prompt is ignored with --num_validation_images 0.")
        return self

    @property
    def uses_validation_loss(self) -> bool:
        """Held-out images are given (`--validation_split` or `--validation_loss_data_dir`)."""
        return self.validation_split is not None or bool(self.validation_loss_data_dir)

    def _validate_validation_loss(self, need) -> None:
        """`--validation_split` in (0, 1), `--validation_loss_steps` >= 1, a held-out folder that
        exists and holds images, and not both sources of held-out images."""
        from .data import list_image_files  # data.py imports this module

        need(not (self.validation_split is not None and self.validation_loss_data_dir),
             "--validation_split and --validation_loss_data_dir both give held-out images: use one of the two")
        need(self.validation_split is None or 0 < self.validation_split < 1,
             f"--validation_split must be between 0 and 1 (the share of instance images held out), "
             f"got {self.validation_split}")
        need(self.validation_loss_steps >= 1,
             f"--validation_loss_steps must be at least 1, got {self.validation_loss_steps}")
        folder = self.validation_loss_data_dir
        if folder:
            need(os.path.isdir(folder), f"--validation_loss_data_dir: folder {folder!r} does not exist")
            need(bool(list_image_files(folder)),
                 f"--validation_loss_data_dir: no PNG, JPEG or WebP image in folder {folder!r}")

    def _validate_dataset_config(self, need) -> None:
        """`--keep_tokens` >= 0 and a separator; with `--dataset_config`: the file parsed and checked,
        its dataset settings written into this config (the file wins, as in kohya), none of the
        instance/class flags it replaces, and no flip or random crop with cached latents."""
        need(self.keep_tokens >= 0, f"--keep_tokens must be 0 or more, got {self.keep_tokens}")
        need(bool(self.caption_separator), "--caption_separator must not be empty")
        if not self.dataset_config:
            return
        from .dataset_config import apply_dataset_settings, load_dataset_config

        replaced = [f"--{name}" for name in ("instance_data_dir", "instance_images", "instance_prompt",
                                             "class_data_dir", "class_prompt") if getattr(self, name)]
        need(not replaced, f"--dataset_config and {' and '.join(replaced)} both give the training images or "
                           "prompts: use one of the two (subsets with image_dir, class_tokens and is_reg replace them)")
        dataset = load_dataset_config(self.dataset_config, self)
        need(not self.with_prior_preservation or bool(dataset.reg_subsets),
             f"--with_prior_preservation with --dataset_config {self.dataset_config} needs a subset with "
             "is_reg = true (the regularisation images)")
        apply_dataset_settings(self, dataset)
        if self.uses_latent_cache:
            flag = "--cache_latents_to_disk" if not self.cache_latents else "--cache_latents"
            for subset in dataset.subsets:
                for key in ("flip_aug", "random_crop"):
                    need(not getattr(subset, key),
                         f"--dataset_config {self.dataset_config}: {subset.where}.{key} is true, but {flag} encodes "
                         f"every image once (the same pixels every step): set {key} = false or drop {flag}")

    def _validate_buckets_and_cache(self, need) -> None:
        """Bucket range, latent caching (which needs the same pixels every step) and image sizes."""
        for flag in ("validation_width", "validation_height"):
            value = getattr(self, flag)
            need(value is None or (value > 0 and value % 8 == 0),
                 f"--{flag} must be a positive multiple of 8, got {value}")
        for flag in ("crops_coords_top_left_h", "crops_coords_top_left_w"):
            value = getattr(self, flag)
            need(value is None or value >= 0, f"--{flag} must be 0 or more, got {value}")
        if self.enable_bucket:
            step = self.bucket_reso_steps
            need(step >= 8 and step % 8 == 0, f"--bucket_reso_steps must be a positive multiple of 8, got {step}")
            need(self.min_bucket_reso % step == 0 and self.max_bucket_reso % step == 0,
                 f"--min_bucket_reso {self.min_bucket_reso} and --max_bucket_reso {self.max_bucket_reso} must be "
                 f"multiples of --bucket_reso_steps {step}")
            need(step <= self.min_bucket_reso <= self.resolution <= self.max_bucket_reso,
                 f"--resolution {self.resolution} must lie between --min_bucket_reso {self.min_bucket_reso} and "
                 f"--max_bucket_reso {self.max_bucket_reso}")
        elif (self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps, self.bucket_no_upscale) != (
                256, 1024, 64, False):
            warnings.warn("The bucket flags have no effect without --enable_bucket.")
        if self.uses_latent_cache and not self.dataset_config:  # a dataset config's subsets: checked there
            flag = "--cache_latents_to_disk" if not self.cache_latents else "--cache_latents"
            need(not self.random_flip,
                 f"{flag} encodes every image once, so it cannot be used with --random_flip (a new flip every "
                 "step): drop one of the two")
            need(self.center_crop,
                 f"{flag} encodes every image once, so it needs --center_crop (without it every step takes a "
                 "new random crop)")

    def _validate_ema(self, need) -> None:
        """`--ema_decay` in (0, 1), a known `--ema_warmup`, `--ema_update_after_step` >= 0; the other
        EMA flags without `--use_ema` only warn (they change nothing)."""
        from ..ema import EMA_WARMUPS

        need(0 < self.ema_decay < 1,
             f"--ema_decay must be between 0 and 1 (exclusive; e.g. 0.999), got {self.ema_decay}")
        need(self.ema_warmup in EMA_WARMUPS,
             f"--ema_warmup {self.ema_warmup!r} is not one of: {', '.join(EMA_WARMUPS)}")
        need(self.ema_update_after_step >= 0,
             f"--ema_update_after_step must be 0 or more, got {self.ema_update_after_step}")
        if not self.use_ema:
            given = [f"--{name}" for name, default in (("ema_decay", 0.999), ("ema_warmup", "ratio"),
                                                       ("ema_update_after_step", 0), ("ema_cpu", False),
                                                       ("ema_save_raw", False)) if getattr(self, name) != default]
            if given:
                warnings.warn(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect without --use_ema.")

    def _validate_masks(self, need) -> None:
        """Where the loss masks come from: `--masked_loss` needs `--conditioning_data_dir` (a folder
        holding images) or `--alpha_mask`; the folder without `--masked_loss`, or with `--alpha_mask`
        too, is refused rather than silently ignored. The masks themselves are checked per image
        (`masks.find_loss_masks`) before anything is loaded."""
        from .data import list_image_files  # data.py imports this module

        folder = self.conditioning_data_dir
        need(not self.masked_loss or bool(folder) or self.alpha_mask,
             "--masked_loss needs --conditioning_data_dir (a folder with one mask image per instance image, same "
             "file name: white trains, black is ignored) or --alpha_mask (the images' transparency is the mask)")
        if not folder:
            return
        need(self.masked_loss, f"--conditioning_data_dir {folder!r} holds loss masks, which only --masked_loss uses: "
                               "add --masked_loss")
        need(not self.alpha_mask, "--alpha_mask and --conditioning_data_dir both give the loss masks: use one of the two")
        need(os.path.isdir(folder), f"--conditioning_data_dir: folder {folder!r} does not exist")
        need(bool(list_image_files(folder)), f"--conditioning_data_dir: no PNG, JPEG or WebP mask image in folder {folder!r}")


    def _validate_lycoris(self, need) -> None:
        """`--network_module` / `--network_args` (LoHa, LoKr): see lycoris_network.check_network_config."""
        from .lycoris_network import check_network_config

        check_network_config(self)

    def _validate_layers(self, need) -> None:
        """A known `--lora_layers`; `--conv_rank` / `--conv_alpha` positive, conv_alpha only with
        conv_rank, and conv_rank only with a preset LoCon extends (kohya's default LoRA: attn-ff)."""
        need(self.lora_layers in LORA_LAYERS,
             f"--lora_layers {self.lora_layers!r} is not one of: {', '.join(LORA_LAYERS)}")
        need(self.conv_rank is None or self.conv_rank >= 1, f"--conv_rank must be at least 1, got {self.conv_rank}")
        need(self.conv_alpha is None or self.conv_alpha > 0, f"--conv_alpha must be positive, got {self.conv_alpha}")
        need(self.conv_alpha is None or self.conv_rank is not None,
             "--conv_alpha needs --conv_rank (the rank of the LoRA on the ResNet convolutions)")
        need(self.conv_rank is None or self.lora_layers != "attn",
             "--conv_rank adapts the ResNet convolutions on top of kohya's default layers, which --lora_layers attn "
             "does not include: add --lora_layers attn-ff (or all-linear)")


__all__ = ["TrainConfig", "MIXED_PRECISION", "REPORT_TO", "INTERPOLATION_MODES", "PRIOR_GENERATION_PRECISION",
           "default_report_to", "LORA_LAYERS"]
