"""The app after a crash: `python app.py` killed with SIGKILL in the middle of a training run, then
started again over the same output folder. The run is listed as interrupted at its last checkpoint
(never as finished), resumes through /resume_lora exactly as an uninterrupted run goes, and nothing
half-written is offered for download; a run that died before its first checkpoint is listed as
failed and can be deleted."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 80  # the app checkpoints about ten times per run: every 8 steps here


def _start_app(base_model: str, output_root: Path, workdir: Path, log_name: str, port: int):
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    log = open(workdir / log_name, "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--output-root",
                             str(output_root), "--base-model", base_model],
                            cwd=str(workdir), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(1200):  # polls until the server answers; no assertion on how long it takes
        if proc.poll() is not None:
            pytest.fail(f"app.py exited early:\n{(workdir / log_name).read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return proc, url
        except OSError:
            time.sleep(0.25)
    _kill(proc)
    pytest.fail("app.py never served the page")


def _kill(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill(proc)


@pytest.fixture(scope="module")
def images(tmp_path_factory, write_images):  # tests/conftest.py, as is free_port
    return write_images(tmp_path_factory.mktemp("photos"), [(40, 48)] * 2, prefix="photo")


def _train_args(images, name):
    return dict(images=[handle_file(p) for p in images], instance_prompt="a photo of sks dog",
                max_train_steps=STEPS, learning_rate=1e-3, rank=4, optimizer="adaprelora", resolution=32,
                lora_name=name, num_samples=0, seed=0)


def _rows(client) -> dict[str, list]:
    table = client.predict(None, api_name="/lora_widgets")[0]
    return {row[0]: row for row in table["data"]}


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_a_killed_run_is_listed_as_interrupted_and_resumes_exactly(tmp_path, images, free_port):
    import torch
    from safetensors.torch import load_file

    from adaprelora.testing.tiny_sd import tiny_sd_pipeline_dir

    base, root = tiny_sd_pipeline_dir(), tmp_path / "out"
    loras = root / "loras"

    # 1. Train, and kill the app (SIGKILL, no clean-up) once a few checkpoints exist.
    proc, url = _start_app(base, root, tmp_path, "app1.log", free_port())
    try:
        job = Client(url, verbose=False).submit(**_train_args(images, "crashed"), api_name="/train")
        for update in job:
            match = re.search(rf"step (\d+)/{STEPS}", str(update[0]) if isinstance(update, tuple) else "")
            if match and int(match.group(1)) >= 20:
                break
        else:
            pytest.fail(f"training never reached step 20:\n{(tmp_path / 'app1.log').read_text()}")
    finally:
        _kill(proc)
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (loras / "crashed").glob("checkpoint-*"))
    assert checkpoints and checkpoints[-1] >= 16 and checkpoints[-1] < STEPS, checkpoints
    last_checkpoint = checkpoints[-1]
    assert json.loads((loras / "crashed" / "adaprelora_app.json").read_text())["status"] == "training"
    # What a kill in the middle of writing the final file would leave, and a run that died before
    # its first checkpoint (the same folder without checkpoints).
    (loras / "crashed" / "pytorch_lora_weights.safetensors").write_bytes(b"half a file")
    shutil.copytree(loras / "crashed", loras / "early")
    for folder in (loras / "early").glob("checkpoint-*"):
        shutil.rmtree(folder)
    meta = json.loads((loras / "early" / "adaprelora_app.json").read_text())
    (loras / "early" / "adaprelora_app.json").write_text(json.dumps(dict(meta, name="early")))

    # 2. A new app over the same folder.
    proc, url = _start_app(base, root, tmp_path, "app2.log", free_port())
    try:
        client = Client(url, verbose=False)
        rows = _rows(client)
        assert rows["crashed"][1] == f"interrupted at step {last_checkpoint}", rows["crashed"]
        assert rows["early"][1] == "failed", rows["early"]
        assert client.predict(api_name="/loras") == [], "neither is offered for generation"
        details, _, dl_diffusers, dl_kohya = client.predict("crashed", api_name="/lora_details")
        assert details["status"] == f"interrupted at step {last_checkpoint}" and details["resumable"] is True
        assert not dl_diffusers.get("visible") and not dl_kohya.get("visible"), "no half-written file to download"
        with pytest.raises(AppError, match="no checkpoint to continue from"):
            client.predict("early", api_name="/resume_lora")

        # 3. Resume: through the same trainer, from the last checkpoint, to the end.
        job = client.submit("crashed", api_name="/resume_lora")
        statuses = [str(u[0]) for u in job if isinstance(u, tuple)]
        status, _, _, dl_diffusers, dl_kohya, summary = job.result()
        assert summary["status"] == "done" and summary["steps"] == STEPS, summary
        assert any("resumed from" in s and f"at step {last_checkpoint}" in s for s in statuses), statuses[:5]
        assert summary["verified"].startswith("verified: diffusers file ok, kohya file ok"), summary
        assert dl_diffusers["visible"] and dl_kohya["visible"]
        assert _rows(client)["crashed"][1] == "done"
        assert client.predict(api_name="/loras") == ["crashed"]

        # 4. The same run without the crash gives the same LoRA.
        straight = client.predict(**_train_args(images, "straight"), api_name="/train")[5]
        assert straight["status"] == "done"
        resumed_w = load_file(str(root / summary["diffusers"]))
        straight_w = load_file(str(root / straight["diffusers"]))
        assert resumed_w.keys() == straight_w.keys() and resumed_w
        for key, value in straight_w.items():
            torch.testing.assert_close(resumed_w[key], value, rtol=1e-5, atol=1e-7, msg=key)

        # 5. The failed one can be deleted.
        assert "early" not in client.predict("early", api_name="/delete_lora")
        assert not (loras / "early").exists()
    finally:
        _stop(proc)
