"""The safetensors header keys LoRA tools read: kohya's `ss_*`, `sshs_*` hashes and `modelspec.*`.

AUTOMATIC1111, ComfyUI, Forge, civitai-style uploaders and LoRA browsers show or use these keys:
which base model a LoRA is for (`ss_base_model_version`, `ss_v2`, `modelspec.architecture`), what
it was trained on (`ss_num_train_images`, `ss_tag_frequency`, `ss_resolution`), when
(`ss_training_started_at`, `ss_training_finished_at`, `modelspec.date`) and a content hash
(`sshs_model_hash`, `sshs_legacy_hash`, which sd-webui-additional-networks indexes). Values are
written as kohya-ss/sd-scripts writes them: every value a string, booleans as "True"/"False",
timestamps as `str(time.time())`, JSON for the nested ones.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from typing import Iterable, Optional

from .family import ModelFamily

MODELSPEC_VERSION = "1.0.0"
IMPL_DIFFUSERS = "diffusers"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"
_LEGACY_HASH_OFFSET, _LEGACY_HASH_LENGTH = 0x100000, 0x10000


def base_model_version(family: ModelFamily) -> str:
    """kohya's `ss_base_model_version`: "sd_v1", "sd_v2", "sd_v2_v" (v-prediction) or "sdxl_base_v1-0"."""
    if family.sdxl:
        return SDXL_BASE_MODEL_VERSION
    return ("sd_v2" if family.v2 else "sd_v1") + ("_v" if family.v_parameterization else "")


def modelspec_architecture(family: ModelFamily) -> str:
    """`modelspec.architecture` of a LoRA for a base model of `family`."""
    if family.sdxl:
        arch = "stable-diffusion-xl-v1-base"
    elif family.v2:
        arch = "stable-diffusion-v2-768-v" if family.v_parameterization else "stable-diffusion-v2-512"
    else:
        arch = "stable-diffusion-v1"
    return f"{arch}/lora"


def modelspec_implementation(family: ModelFamily) -> str:
    """`modelspec.implementation`: kohya names Stability's code for SDXL LoRAs, diffusers for v1/v2."""
    return IMPL_STABILITY_AI if family.sdxl else IMPL_DIFFUSERS


def tag_frequency(groups: Iterable[tuple[str, list[str]]]) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: per image folder, how often each comma-separated tag of the
    captions occurs (tags stripped and lower-cased, empty ones skipped)."""
    out: dict[str, dict[str, int]] = {}
    for folder, captions in groups:
        counts = out.setdefault(folder, {})
        for caption in captions:
            for tag in (caption or "").split(","):
                tag = tag.strip().lower()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
    return out


def image_groups(records, prompt: Optional[str]) -> list[tuple[str, list[str]]]:
    """(folder name, captions) per folder of `records` (ImageRecord: path, caption), an image without
    its own caption counting with `prompt`, as kohya counts a DreamBooth folder's class tokens."""
    groups: dict[str, list[str]] = {}
    for record in records:
        folder = os.path.basename(os.path.dirname(os.path.abspath(record.path)))
        groups.setdefault(folder, []).append(record.caption or prompt or "")
    return list(groups.items())


def dataset_metadata(instance_records, instance_prompt: Optional[str], class_records=(),
                     class_prompt: Optional[str] = None) -> dict[str, str]:
    """`ss_num_train_images`, `ss_num_reg_images`, `ss_tag_frequency`, `ss_dataset_dirs` and
    `ss_reg_dataset_dirs` for a DreamBooth run (every image seen once per epoch: repeats 1; with a
    dataset config, per subset: `subset_metadata`)."""
    if any(getattr(r, "subset", None) for r in instance_records):
        return subset_metadata(list(instance_records) + list(class_records or []))
    instance = image_groups(instance_records, instance_prompt)
    reg = image_groups(class_records or [], class_prompt)
    dirs = lambda groups: {name: {"n_repeats": 1, "img_count": len(caps)} for name, caps in groups}  # noqa: E731
    return {
        "ss_num_train_images": str(len(instance_records)),
        "ss_num_reg_images": str(len(class_records or [])),
        "ss_tag_frequency": json.dumps(tag_frequency(instance + reg)),
        "ss_dataset_dirs": json.dumps(dirs(instance)),
        "ss_reg_dataset_dirs": json.dumps(dirs(reg)),
    }


def subset_metadata(records) -> dict[str, str]:
    """The dataset keys of a run from a dataset config (records carrying their `subset`), as kohya
    writes them: image counts with repeats, `ss_tag_frequency` per subset folder (each image's
    caption once, or its `class_tokens`), `ss_dataset_dirs` / `ss_reg_dataset_dirs` {folder name:
    {"n_repeats", "img_count"}} per subset (a folder name seen twice gets " (2)")."""
    subsets: dict = {}
    for record in records:
        subsets.setdefault(record.subset, []).append(record)
    dirs: dict[bool, dict] = {False: {}, True: {}}
    counts = {False: 0, True: 0}
    groups = []
    for subset, members in subsets.items():
        folder = os.path.basename(os.path.normpath(subset.image_dir))
        groups.append((folder, [(r.caption or "").replace("\n", ", ") for r in members]))
        name, i = folder, 2
        while name in dirs[False] or name in dirs[True]:
            name, i = f"{folder} ({i})", i + 1
        dirs[subset.is_reg][name] = {"n_repeats": subset.num_repeats, "img_count": len(members)}
        counts[subset.is_reg] += subset.num_repeats * len(members)
    return {
        "ss_num_train_images": str(counts[False]),
        "ss_num_reg_images": str(counts[True]),
        "ss_tag_frequency": json.dumps(tag_frequency(groups)),
        "ss_dataset_dirs": json.dumps(dirs[False]),
        "ss_reg_dataset_dirs": json.dumps(dirs[True]),
    }


def base_model_metadata(family: ModelFamily) -> dict[str, str]:
    """`ss_v2` and `ss_base_model_version` as kohya writes them."""
    return {"ss_v2": str(bool(family.v2)), "ss_base_model_version": base_model_version(family)}


def modelspec_metadata(family: ModelFamily, *, title: str, resolution: int, timestamp: float,
                       trigger_phrase: Optional[str] = None) -> dict[str, str]:
    """The Stability AI ModelSpec keys of a LoRA (`modelspec.*`), as kohya's `sai_model_spec` fills them."""
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(family),
        "modelspec.implementation": modelspec_implementation(family),
        "modelspec.title": title,
        "modelspec.resolution": f"{int(resolution)}x{int(resolution)}",
        "modelspec.date": _dt.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": "v" if family.v_parameterization else "epsilon",
    }
    if trigger_phrase:
        meta["modelspec.trigger_phrase"] = trigger_phrase
    return meta


def kohya_hashes(tensors: dict, metadata: dict[str, str]) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) of a LoRA file, computed as kohya does.

    Both hash the file the tensors make with only the `ss_*` header keys (so that editing other
    header keys later leaves them valid): the model hash is the SHA-256 of everything after the
    header (the tensor bytes), the legacy hash the first 8 hex digits of the SHA-256 of the
    0x10000 bytes at offset 0x100000 (empty, hence a fixed value, for files under 1 MiB).
    """
    from safetensors.torch import save

    blob = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len:]).hexdigest()
    legacy = hashlib.sha256(blob[_LEGACY_HASH_OFFSET:_LEGACY_HASH_OFFSET + _LEGACY_HASH_LENGTH]).hexdigest()[:8]
    return model_hash, legacy


__all__ = ["base_model_metadata", "base_model_version", "dataset_metadata", "image_groups", "kohya_hashes",
           "modelspec_architecture", "modelspec_implementation", "modelspec_metadata", "subset_metadata",
           "tag_frequency"]
