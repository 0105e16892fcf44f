"""Test-wide settings (offline Hub, no analytics, Triton kernels in the CPU interpreter) and the
fixtures several modules share: thread settings, the tiny SD / SDXL pipelines, instance images,
free ports, and the `accelerate launch train_dreambooth.py` runner with its common flags.

Markers (registered in pyproject.toml): `slow` (over about 10 s on the 2-core CI machine; the fast
subset is `pytest -m "not slow"`), `browser` (headless Chromium), `gpu` (needs CUDA)."""
import os
import socket
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

# Under pytest-xdist (the README's `-n 2`), each worker gets its share of the cores: intra-op threads
# beyond that only spin against the other worker's. Set before torch is imported (children inherit it).
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
CORES_PER_WORKER = max(1, (os.cpu_count() or 1) // XDIST_WORKERS)
if XDIST_WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(CORES_PER_WORKER))
# The longest modules, started first so that the workers finish together (`--dist loadfile` hands
# out whole modules in collection order); the rest keep theirs.
LONGEST_FIRST = ("test_tiny_t2i_model.py", "test_app_tiny.py", "test_app.py", "test_train_dreambooth.py",
                 "test_app_browser.py", "test_bad_input.py", "test_validation_loss_flags.py",
                 "test_sdxl_buckets_cache.py", "test_crash_recovery.py")

ROOT = Path(__file__).resolve().parents[1]
# The instance images of `instance_dir`, (height, width): wide, tall and square, so that
# aspect-ratio buckets tell them apart.
INSTANCE_SHAPES = [(64, 128), (128, 64), (80, 80)]
INSTANCE_PROMPT = "a photo of sks toy"


def pytest_collection_modifyitems(config, items):
    """The longest modules first (see LONGEST_FIRST); order within a module is kept."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_runtest_setup(item):
    """A test marked `gpu` is skipped, with the reason, where torch sees no CUDA device."""
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")


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
    machine, never more than there are (one each under the README's two xdist workers)."""
    return min(2, CORES_PER_WORKER)


@pytest.fixture(scope="session")
def tiny_sd() -> str:
    """Folder of the tiny Stable Diffusion 1.x pipeline built in code, saved once per process."""
    from adaprelora.testing.tiny_sd import tiny_sd_pipeline_dir

    return tiny_sd_pipeline_dir()


@pytest.fixture(scope="session")
def tiny_sdxl() -> str:
    """Folder of the tiny SDXL pipeline built in code, saved once per process."""
    from adaprelora.testing.tiny_sdxl import tiny_sdxl_pipeline_dir

    return tiny_sdxl_pipeline_dir()


@pytest.fixture(scope="session")
def write_images():
    """`write_images(folder, shapes, prefix="img", seed=0)`: random RGB PNGs `<prefix><i>.png` of the
    given (height, width) shapes in `folder` (made if missing); returns their paths."""
    import numpy as np
    from PIL import Image

    def write(folder, shapes, prefix: str = "img", seed: int = 0) -> list[str]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        paths = []
        for i, (h, w) in enumerate(shapes):
            path = folder / f"{prefix}{i}.png"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
        return paths

    return write


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory, write_images) -> str:
    """A DreamBooth subject folder: `img0.png` .. `img2.png` in the shapes of INSTANCE_SHAPES."""
    folder = tmp_path_factory.mktemp("instance") / "toy"
    write_images(folder, INSTANCE_SHAPES)
    return str(folder)


@pytest.fixture(scope="session")
def free_port():
    """`free_port()`: a TCP port on 127.0.0.1 that nothing listens on (for a server under test)."""
    def pick() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def dreambooth_args():
    """`dreambooth_args(model, instance_dir, output_dir, steps, resolution=32)`: the flags every small
    `train_dreambooth.py` run in the tests shares (batch 1, seed 0, fp32, INSTANCE_PROMPT); callers
    add what their run is about."""
    def args(model: str, instance_dir: str, output_dir, steps: int, resolution: int = 32) -> list[str]:
        return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instance_dir),
                "--instance_prompt", INSTANCE_PROMPT, "--output_dir", str(output_dir),
                "--resolution", str(resolution), "--train_batch_size", "1", "--max_train_steps", str(steps),
                "--seed", "0", "--mixed_precision", "no"]

    return args


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Run `accelerate launch --config_file <basic CPU config> train_dreambooth.py ARGS` as users do;
    `threads` is accelerate's --num_cpu_threads_per_process. Raises with both streams on a failed run
    unless `expect_ok=False`; a run past `timeout` seconds fails instead of hanging the suite (the default
    stays under pytest's 600 s per test, so the run's own timeout, naming the command, fires first)."""
    from accelerate.utils import write_basic_config

    config_file = str(tmp_path_factory.mktemp("accelerate") / "default_config.yaml")
    write_basic_config(mixed_precision="no", save_location=config_file)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))

    def run(args: list[str], expect_ok: bool = True, threads: int = 1, timeout: float = 480) -> subprocess.CompletedProcess:
        # --quiet: accelerate's own launcher would otherwise add its CalledProcessError traceback on a
        # non-zero exit, hiding what the script itself printed.
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--quiet", "--config_file",
               config_file, "--cpu", "--num_cpu_threads_per_process", str(threads), str(ROOT / "train_dreambooth.py")]
        proc = subprocess.run(cmd + args, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)
        if expect_ok and proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}")
        return proc

    return run
