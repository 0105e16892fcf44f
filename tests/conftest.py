"""Test-wide settings: offline Hub, no analytics, Triton kernels run in the CPU interpreter; the
shared `accelerate launch train_dreambooth.py` runner."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Must be set before triton is first imported: lets @triton.jit kernels run on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning
    threads slow them down many times. Modules opt in with `pytest.mark.usefixtures`; restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def training_threads() -> int:
    """Torch threads for a test that trains while pytest only waits: both cores of the 2-core CI
    machine, never more than there are."""
    return min(2, os.cpu_count() or 1)


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Run `accelerate launch --config_file <basic CPU config> train_dreambooth.py ARGS` as users do;
    `threads` is accelerate's --num_cpu_threads_per_process. Raises with both streams on a failed run
    unless `expect_ok=False`; a run past `timeout` seconds fails instead of hanging the suite."""
    from accelerate.utils import write_basic_config

    config_file = str(tmp_path_factory.mktemp("accelerate") / "default_config.yaml")
    write_basic_config(mixed_precision="no", save_location=config_file)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))

    def run(args: list[str], expect_ok: bool = True, threads: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
        # --quiet: accelerate's own launcher would otherwise add its CalledProcessError traceback on a
        # non-zero exit, hiding what the script itself printed.
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--quiet", "--config_file",
               config_file, "--cpu", "--num_cpu_threads_per_process", str(threads), str(ROOT / "train_dreambooth.py")]
        proc = subprocess.run(cmd + args, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)
        if expect_ok and proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}")
        return proc

    return run
