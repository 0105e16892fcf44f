"""`--dataset_config FILE.toml`: kohya sd-scripts' dataset config files, read into plain dataclasses.

The file has `[general]`, `[[datasets]]` and `[[datasets.subsets]]` tables (JSON with the same
shape works too). A value set in a subset wins over its dataset's, which wins over `[general]`'s,
which wins over the command line's flag of the same meaning (kohya's order): `resolution`,
`batch_size` (`--train_batch_size`), the bucket settings, `shuffle_caption`, `keep_tokens`,
`caption_separator`, `caption_dropout_rate` (`--class_caption_dropout_rate` for `is_reg` subsets)
and `flip_aug` (`--random_flip`). Subsets are DreamBooth-style: `image_dir` with optional caption
files, `class_tokens` for the images without one, `num_repeats`, and `is_reg` for regularisation
(prior-preservation) images.

Several `[[datasets]]` train together when their dataset settings (resolution, batch size,
buckets) agree; different ones are an error naming the key, since one run trains at one resolution
here. kohya keys this trainer does not implement (fine-tuning `metadata_file`, `color_aug = true`,
`face_crop_aug_range`, ...) and keys kohya does not know are errors naming the key and the file,
never ignored. Parsing does no image decoding: `data.scan_dataset_config` reads the images.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Optional

from ..errors import UserError
from .captions import CaptionOptions
from .data import list_image_files

if TYPE_CHECKING:
    from .config import TrainConfig

# Dataset settings: [general] or [[datasets]].
_DATASET_KEYS = {"resolution": "resolution", "batch_size": int, "enable_bucket": bool, "min_bucket_reso": int,
                 "max_bucket_reso": int, "bucket_reso_steps": int, "bucket_no_upscale": bool}
# Subset settings: [general], [[datasets]] or [[datasets.subsets]].
_SUBSET_KEYS = {
    "num_repeats": int, "flip_aug": bool, "random_crop": bool, "shuffle_caption": bool, "keep_tokens": int,
    "caption_separator": str, "keep_tokens_separator": str, "secondary_separator": str, "caption_prefix": str,
    "caption_suffix": str, "enable_wildcard": bool, "caption_dropout_rate": float,
    "caption_dropout_every_n_epochs": int, "caption_tag_dropout_rate": float, "caption_extension": str,
    "class_tokens": str,
    "color_aug": bool,  # only false: no colour augmentation here
    "cache_info": bool,  # kohya's cache of image sizes and captions: a loading-speed option, no effect on training
}
# Only in [[datasets.subsets]].
_SUBSET_ONLY_KEYS = {"image_dir": str, "is_reg": bool}
# kohya options this trainer does not implement, with what to do instead.
_UNSUPPORTED = {
    "metadata_file": "fine-tuning subsets (metadata_file) are not supported: give image_dir with caption files",
    "in_json": "fine-tuning subsets are not supported: give image_dir with caption files",
    "face_crop_aug_range": "face-crop augmentation is not supported",
    "token_warmup_min": "token warm-up is not supported",
    "token_warmup_step": "token warm-up is not supported",
    "skip_image_resolution": "skipping small images is not supported: leave them out of image_dir",
    "resize_interpolation": "use --image_interpolation_mode",
    "validation_split": "use --validation_split",
    "validation_seed": "the held-out images are drawn by --seed",
    "validation_split_num": "use --validation_split",
    "network_multiplier": "per-dataset network multipliers are not supported",
    "custom_attributes": "custom attributes are not supported",
    "sample_ratio": "sample_ratio is not supported: use num_repeats",
    "alpha_mask": "use the --alpha_mask flag",
    "conditioning_data_dir": "conditioning images are not supported in dataset configs",
    "random_crop_padding_percent": "random crop padding is not supported",
    "debug_dataset": "debug_dataset is not supported",
    "max_token_length": "max_token_length is not supported",
    "prior_loss_weight": "use --prior_loss_weight",
}
_FALSE_ONLY = {"color_aug": "colour augmentation is not supported"}


@dataclass(frozen=True)
class Subset:
    """One `[[datasets.subsets]]` with every setting resolved (subset > dataset > general > flags)."""

    image_dir: str
    is_reg: bool = False
    class_tokens: Optional[str] = None
    num_repeats: int = 1
    caption_extension: str = ".txt"
    flip_aug: bool = False
    random_crop: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption: CaptionOptions = CaptionOptions()
    where: str = ""  # "datasets[0].subsets[1]", for messages


@dataclass(frozen=True)
class DatasetSettings:
    """What a `[[datasets]]` sets for all its subsets; several datasets must agree on it."""

    resolution: int
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool


@dataclass(frozen=True)
class DatasetConfig:
    """A parsed dataset config file: its path, the shared dataset settings and every subset."""

    path: str
    settings: DatasetSettings
    subsets: tuple[Subset, ...]

    @property
    def instance_subsets(self) -> tuple[Subset, ...]:
        return tuple(s for s in self.subsets if not s.is_reg)

    @property
    def reg_subsets(self) -> tuple[Subset, ...]:
        return tuple(s for s in self.subsets if s.is_reg)


def _error(path: str, message: str) -> UserError:
    return UserError(f"--dataset_config {path}: {message}")


def read_config_file(path: str) -> dict:
    """The file's tables as a dict: TOML (tomllib), or JSON for a `.json` file."""
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise UserError(f"--dataset_config: file {path!r} {what}")
    if path.lower().endswith(".json"):
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _error(path, f"invalid JSON: {err}") from None
    else:
        import tomllib

        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise _error(path, f"invalid TOML: {err}") from None
    if not isinstance(data, dict):
        raise _error(path, "the file must hold [general] and [[datasets]] tables")
    return data


def _check_value(path: str, where: str, key: str, value: Any, kind) -> Any:
    """`value` of `key` checked against its kind (int, float, bool, str, or "resolution")."""
    name = f"{where}.{key}" if where else key
    if kind == "resolution":
        if isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value):
            if value[0] != value[1]:
                raise _error(path, f"{name} = {value}: only square resolutions are supported (one number, or "
                                   "[n, n]); with enable_bucket = true other shapes get buckets of that area")
            value = value[0]
        if not _is_int(value) or value <= 0 or value % 8:
            raise _error(path, f"{name} must be a positive multiple of 8 (or [n, n]), got {value!r}")
        return int(value)
    ok = {int: _is_int(value), float: _is_int(value) or isinstance(value, float),
          bool: isinstance(value, bool), str: isinstance(value, str)}[kind]
    if not ok:
        raise _error(path, f"{name} must be {'a number' if kind is float else kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _table(path: str, where: str, table: Any, allowed: dict, level: str) -> dict:
    """The settings of one table, each checked; unknown and unsupported keys are errors."""
    if not isinstance(table, dict):
        raise _error(path, f"{where} must be a table")
    out = {}
    for key, value in table.items():
        name = f"{where}.{key}" if where else key
        if key in allowed:
            value = _check_value(path, where, key, value, allowed[key])
            if key in _FALSE_ONLY and value:
                raise _error(path, f"{name} = true: {_FALSE_ONLY[key]}")
            out[key] = value
        elif key in _UNSUPPORTED:
            raise _error(path, f"{name}: kohya option not supported by this trainer ({_UNSUPPORTED[key]})")
        elif key in _SUBSET_ONLY_KEYS or key in _DATASET_KEYS:
            place = "[[datasets.subsets]]" if key in _SUBSET_ONLY_KEYS else "[general] or [[datasets]]"
            raise _error(path, f"{name}: {key} belongs in {place}, not in {level}")
        else:
            raise _error(path, f"{name}: unknown key")
    return out


def load_dataset_config(path: str, cfg: Optional["TrainConfig"] = None) -> DatasetConfig:
    """Parse and check the file at `path`; the flags of `cfg` fill what the file leaves unset.

    Raises `UserError` (one line naming the file and the key) for invalid TOML/JSON, unknown or
    unsupported keys, wrong types or ranges, a missing `image_dir` folder, a subset without images,
    and datasets whose settings differ. Images are listed, not decoded.
    """
    from .config import TrainConfig  # config.py imports this module lazily

    cfg = cfg or TrainConfig()
    data = read_config_file(path)
    for key in data:
        if key not in ("general", "datasets"):
            hint = " (subset settings go in [[datasets.subsets]])" if key in ("subsets", "dataset") else ""
            raise _error(path, f"{key}: unknown key{hint}; the file has [general] and [[datasets]] tables")
    general = _table(path, "general", data.get("general", {}), {**_DATASET_KEYS, **_SUBSET_KEYS}, "[general]")
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise _error(path, "no [[datasets]] table: add one with at least one [[datasets.subsets]]")
    defaults = {"resolution": cfg.resolution, "batch_size": cfg.train_batch_size, "enable_bucket": cfg.enable_bucket,
                "min_bucket_reso": cfg.min_bucket_reso, "max_bucket_reso": cfg.max_bucket_reso,
                "bucket_reso_steps": cfg.bucket_reso_steps, "bucket_no_upscale": cfg.bucket_no_upscale}
    settings: Optional[DatasetSettings] = None
    subsets: list[Subset] = []
    for d, raw in enumerate(datasets):
        where = f"datasets[{d}]"
        if not isinstance(raw, dict):
            raise _error(path, f"{where} must be a table")
        raw = dict(raw)
        raw_subsets = raw.pop("subsets", None)
        dataset = {**general, **_table(path, where, raw, {**_DATASET_KEYS, **_SUBSET_KEYS}, "[[datasets]]")}
        mine = DatasetSettings(**{k: dataset.get(k, v) for k, v in defaults.items()})
        if mine.batch_size < 1:
            raise _error(path, f"{where}.batch_size must be at least 1, got {mine.batch_size}")
        if not isinstance(raw_subsets, list) or not raw_subsets:
            raise _error(path, f"{where}: no [[datasets.subsets]] table (each needs at least image_dir)")
        seen_dirs = set()
        for s, raw_subset in enumerate(raw_subsets):
            subset = _subset(path, f"{where}.subsets[{s}]", raw_subset, dataset, cfg)
            key = os.path.realpath(subset.image_dir)
            if key in seen_dirs:
                raise _error(path, f"{subset.where}.image_dir {subset.image_dir!r} appears twice in {where}: "
                                   "raise num_repeats instead")
            seen_dirs.add(key)
            subsets.append(subset)
        if settings is not None and mine != settings:
            key = next(f.name for f in fields(DatasetSettings) if getattr(mine, f.name) != getattr(settings, f.name))
            raise _error(path, f"{where}.{key} = {getattr(mine, key)!r} differs from datasets[0]'s "
                               f"{getattr(settings, key)!r}: several [[datasets]] must share resolution, batch_size "
                               "and bucket settings here (train one run per resolution)")
        settings = settings or mine
    if not any(not s.is_reg for s in subsets):
        raise _error(path, "every subset has is_reg = true: add a subset of training images (is_reg = false)")
    return DatasetConfig(path=path, settings=settings, subsets=tuple(subsets))


def _subset(path: str, where: str, raw: Any, inherited: dict, cfg: "TrainConfig") -> Subset:
    """One subset: its own keys over its dataset's (and [general]'s), then the flags' defaults."""
    own = _table(path, where, raw, {**_SUBSET_KEYS, **_SUBSET_ONLY_KEYS}, "[[datasets.subsets]]")
    values = {k: v for k, v in inherited.items() if k in _SUBSET_KEYS}
    values.update(own)
    image_dir = values.get("image_dir")
    if image_dir is None:
        raise _error(path, f"{where}.image_dir is missing (the folder of this subset's images)")
    if not os.path.isdir(image_dir):
        what = "is a file, not a folder" if os.path.exists(image_dir) else "does not exist"
        raise _error(path, f"{where}.image_dir: folder {image_dir!r} {what}")
    if not list_image_files(image_dir):
        raise _error(path, f"{where}.image_dir: no PNG, JPEG or WebP image in folder {image_dir!r}")
    is_reg = values.get("is_reg", False)
    for key, low in (("num_repeats", 1), ("keep_tokens", 0), ("caption_dropout_every_n_epochs", 0)):
        if key in values and values[key] < low:
            raise _error(path, f"{where}.{key} must be at least {low}, got {values[key]}")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if key in values and not 0 <= values[key] <= 1:
            raise _error(path, f"{where}.{key} must be between 0 and 1, got {values[key]}")
    if "caption_separator" in values and not values["caption_separator"]:
        raise _error(path, f"{where}.caption_separator must not be empty")
    caption = CaptionOptions(
        shuffle_caption=values.get("shuffle_caption", cfg.shuffle_caption),
        keep_tokens=values.get("keep_tokens", cfg.keep_tokens),
        caption_separator=values.get("caption_separator", cfg.caption_separator),
        keep_tokens_separator=values.get("keep_tokens_separator", ""),
        secondary_separator=values.get("secondary_separator", ""),
        caption_prefix=values.get("caption_prefix", ""),
        caption_suffix=values.get("caption_suffix", ""),
        caption_tag_dropout_rate=values.get("caption_tag_dropout_rate", 0.0),
        enable_wildcard=values.get("enable_wildcard", False),
    )
    dropout = cfg.class_caption_dropout_rate if is_reg else cfg.caption_dropout_rate
    return Subset(
        image_dir=image_dir, is_reg=is_reg, class_tokens=values.get("class_tokens") or None,
        num_repeats=values.get("num_repeats", 1), caption_extension=values.get("caption_extension", ".txt"),
        flip_aug=values.get("flip_aug", cfg.random_flip), random_crop=values.get("random_crop", False),
        caption_dropout_rate=values.get("caption_dropout_rate", dropout),
        caption_dropout_every_n_epochs=values.get("caption_dropout_every_n_epochs", 0),
        caption=caption, where=where,
    )


def apply_dataset_settings(cfg: "TrainConfig", dataset: DatasetConfig) -> None:
    """Write the file's dataset settings into `cfg` (the file wins over the flags, as in kohya), and
    turn prior preservation on when the file has `is_reg` subsets."""
    s = dataset.settings
    cfg.resolution, cfg.train_batch_size = s.resolution, s.batch_size
    cfg.enable_bucket, cfg.bucket_no_upscale = s.enable_bucket, s.bucket_no_upscale
    cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps = (s.min_bucket_reso, s.max_bucket_reso,
                                                                       s.bucket_reso_steps)
    cfg.with_prior_preservation = bool(dataset.reg_subsets)


__all__ = ["DatasetConfig", "DatasetSettings", "Subset", "apply_dataset_settings", "load_dataset_config",
           "read_config_file"]
