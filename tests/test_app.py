"""The app over HTTP: the real Gradio server launched on 127.0.0.1, driven with gradio_client.

One tiny Stable Diffusion pipeline (built in code) and one server for the module: train 3 steps at
32 px, list, generate, stop a run, the bad-input cases, restart persistence, path safety.
"""
from __future__ import annotations

import json
import os

import pytest

gr = pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from adaprelora.app import build_demo, parse_auth  # noqa: E402
from adaprelora.app.store import LoraStore, StoreError  # noqa: E402

# One server and a training run shared by the module's tests: minutes on 2 cores.
pytestmark = pytest.mark.slow


def _launch(base_model: str, output_root: str, port: int):
    demo = build_demo(base_model, output_root, check_base_model_in_background=False)
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


# tiny_sd, write_images and free_port are tests/conftest.py's.
@pytest.fixture(scope="module")
def images(tmp_path_factory, write_images):
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    paths = write_images(folder, [(40, 48)] * 3, prefix="photo")
    (folder / "notes.txt").write_text("not an image")
    (folder / "fake.png").write_text("text pretending to be a PNG")
    (folder / "truncated.png").write_bytes(open(paths[0], "rb").read()[:120])
    Image.open(paths[0]).save(folder / "anim.gif")  # a real GIF: the command line does not read GIFs
    return {"good": paths, "folder": folder}


@pytest.fixture(scope="module")
def app(tiny_sd, tmp_path_factory, free_port):
    root = str(tmp_path_factory.mktemp("output-root"))
    demo, url = _launch(tiny_sd, root, free_port())
    try:
        yield {"demo": demo, "url": url, "root": root, "client": Client(url, verbose=False)}
    finally:
        demo.close()


@pytest.fixture(scope="module")
def trained(app, images):
    """One 3-step run through /train; its final outputs."""
    client = app["client"]
    job = client.submit(
        [handle_file(p) for p in images["good"]], "a photo of sks dog", 3, 1e-3, 4, "adaprelora", 32,
        lora_name="my dog", validation_steps=2, num_samples=1,
        captions={"headers": ["image", "caption"],
                  "data": [["photo0.png", "sks dog on the grass"], ["photo1.png", ""], ["photo2.png", ""]]},
        api_name="/train",
    )
    updates = list(job)
    result = job.result()
    return {"updates": updates, "result": result}


def _lora_folders(root: str) -> set[str]:
    return set(os.listdir(os.path.join(root, "loras")))


def _refused(call, message: str, client) -> str:
    """`call()` fails with one clear message matching `message` (Gradio's generic "an exception was
    raised" would mean a traceback in the console), and the app answers the next request."""
    with pytest.raises(AppError, match=message) as err:
        call()
    text = str(err.value)
    assert "Traceback" not in text and "upstream Gradio app has raised" not in text and "\n" not in text, text
    assert isinstance(client.predict(api_name="/loras"), list), "the app keeps serving"
    return text


def test_api_has_the_named_endpoints_with_their_parameter_names(app, tiny_sd):
    api = app["client"].view_api(print_info=False, return_format="dict")["named_endpoints"]
    train = [p["parameter_name"] for p in api["/train"]["parameters"]]
    assert train[:7] == ["images", "instance_prompt", "max_train_steps", "learning_rate", "rank", "optimizer",
                         "resolution"], train
    assert all(p["parameter_has_default"] for p in api["/train"]["parameters"][2:]), "extras need defaults"
    # The parameters are the form's fields, and those left out start where the page does (the profile's values).
    from adaprelora.app.defaults import profile_for
    from adaprelora.app.form import TrainForm

    assert train == TrainForm.names(), train
    start = TrainForm.from_profile(profile_for(tiny_sd).train)
    defaults = {p["parameter_name"]: p["parameter_default"] for p in api["/train"]["parameters"]}
    for name in ("max_train_steps", "learning_rate", "rank", "optimizer", "resolution", "train_text_encoder",
                 "validation_steps", "seed", "num_samples", "lora_layers", "conv_rank", "lora_alpha", "use_dora",
                 "use_ema", "validation_split"):
        assert defaults[name] == getattr(start, name), (name, defaults[name], getattr(start, name))
    generate = [p["parameter_name"] for p in api["/generate"]["parameters"]]
    assert generate[:4] == ["prompt", "lora", "num_inference_steps", "seed"], generate
    assert all(p["parameter_has_default"] for p in api["/generate"]["parameters"][1:])
    assert api["/loras"]["parameters"] == []


def test_train_streams_progress_and_returns_the_lora_files(trained, app):
    status, loss_plot, samples, dl_diffusers, dl_kohya, summary = trained["result"]
    assert summary["lora"] == "my-dog" and summary["status"] == "done" and summary["steps"] == 3, summary
    assert "finished at step 3" in status
    assert [row[0] for row in loss_plot["data"] if row[2] == "loss"] == [1, 2, 3], "one loss point per step"
    assert samples and all(os.path.isfile(s["image"]) for s in samples), "sample images come back"
    assert os.path.basename(dl_diffusers["value"]) == "pytorch_lora_weights.safetensors"
    assert dl_kohya["value"].endswith(".safetensors") and dl_kohya["visible"]
    steps_seen = [u[0] for u in trained["updates"] if isinstance(u, tuple) and "step 2/3" in str(u[0])]
    assert steps_seen and "steps/s" in steps_seen[0] and "left" in steps_seen[0], "live step, speed and ETA"
    folder = os.path.join(app["root"], "loras", "my-dog")
    assert os.path.isfile(os.path.join(folder, "pytorch_lora_weights.safetensors"))
    assert len(os.listdir(os.path.join(folder, "instance_images"))) == 3, "uploads copied into the LoRA folder"
    meta = LoraStore(app["root"]).get("my-dog").meta
    assert meta["captions"] == {"000-photo0.png": "sks dog on the grass"}, "per-image captions reach the run"


def test_the_optimizer_dropdown_offers_every_optimizer_and_prodigy_trains(app, images):
    from adaprelora import available_optimizers

    api = app["client"].view_api(print_info=False, return_format="dict")["named_endpoints"]
    optimizer = next(p for p in api["/train"]["parameters"] if p["parameter_name"] == "optimizer")
    offered = str(optimizer["python_type"]["type"])
    assert all(f"'{name}'" in offered for name in available_optimizers()), offered
    job = app["client"].submit([handle_file(images["good"][0])], "a photo of sks dog", 1, 1.0, 4, "prodigy", 32,
                               lora_name="prodigy dog", api_name="/train")
    summary = job.result()[-1]
    assert summary["status"] == "done" and summary["steps"] == 1, summary
    assert LoraStore(app["root"]).get("prodigy-dog").meta["optimizer"] == "prodigy"
    assert "prodigy-dog" not in app["client"].predict("prodigy-dog", api_name="/delete_lora")  # leave the root as it was


def test_loras_lists_the_trained_lora_and_generate_uses_it(trained, app):
    import numpy as np
    from PIL import Image

    client = app["client"]
    assert client.predict(api_name="/loras") == ["my-dog"]
    images = client.predict("a photo of sks dog", "my-dog", 2, 7, num_images=2, api_name="/generate")
    assert len(images) == 2 and all(os.path.isfile(i["image"]) for i in images)
    plain = client.predict("a photo of sks dog", "(none)", 2, 7, api_name="/generate")
    assert len(plain) == 1
    pixels = lambda result: np.asarray(Image.open(result[0]["image"])).astype(int)  # noqa: E731
    off = client.predict("a photo of sks dog", "my-dog", 2, 7, lora_scale=0.0, api_name="/generate")
    on = client.predict("a photo of sks dog", "my-dog", 2, 7, lora_scale=1.0, api_name="/generate")
    assert (pixels(off) == pixels(plain)).all(), "LoRA scale 0 gives the base model's image"
    assert (pixels(on) != pixels(plain)).any(), "the LoRA changes the image (and is unloaded afterwards)"
    written = os.listdir(os.path.join(app["root"], "generated"))
    assert written, "generated images are saved under the output root"


def test_a_new_app_over_the_same_output_root_lists_the_lora(trained, app, tiny_sd, free_port):
    demo, url = _launch(tiny_sd, app["root"], free_port())
    try:
        client = Client(url, verbose=False)
        assert client.predict(api_name="/loras") == ["my-dog"]
        details = client.predict("my-dog", api_name="/lora_details")
        assert details[0]["optimizer"] == "adaprelora" and details[0]["rank"] == 4
    finally:
        demo.close()


def test_one_training_at_a_time_and_stop_keeps_the_lora(app, images, trained):
    import time

    from gradio_client.utils import Status

    client = Client(app["url"], verbose=False)  # its own session: /stop reaches this session's run
    job = client.submit([handle_file(images["good"][0])], "a photo of sks cat", 10_000, 1e-4, 4, "adamw", 32,
                        lora_name="stopped cat", validation_steps=10_000, num_samples=0, api_name="/train")
    for update in job:
        if isinstance(update, tuple) and "step 1/" in str(update[0]):
            break
    other = Client(app["url"], verbose=False)
    waiting = other.submit([handle_file(images["good"][1])], "a photo of sks cow", 1, 1e-4, 4, "adamw", 32,
                           lora_name="queued cow", num_samples=0, api_name="/train")
    while waiting.status().code in (Status.STARTING, Status.JOINING_QUEUE):
        time.sleep(0.05)
    assert waiting.status().code == Status.IN_QUEUE, "a second training waits for the first"
    assert not job.done()

    client.predict(api_name="/stop")
    summary = job.result()[5]
    assert summary["status"] == "stopped" and 1 <= summary["steps"] < 10_000, summary
    assert os.path.isfile(os.path.join(app["root"], summary["diffusers"]))
    assert os.path.isfile(os.path.join(app["root"], summary["kohya"]))
    assert waiting.result()[5]["status"] == "done", "the queued run starts once the first one ends"
    assert {"stopped-cat", "queued-cow"} <= set(client.predict(api_name="/loras"))

    assert "queued-cow" not in client.predict("queued-cow", api_name="/delete_lora")
    assert not os.path.exists(os.path.join(app["root"], "loras", "queued-cow")), "delete removes the folder"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(images=[]), "Upload at least one image"),
        (dict(instance_prompt="   "), "instance prompt"),
        (dict(max_train_steps=0), "Training steps must be between 1"),
        (dict(learning_rate=0), "Learning rate must be above 0"),
        (dict(learning_rate=-1e-4), "Learning rate must be above 0"),
        (dict(rank=0), "LoRA rank must be between 1"),
        (dict(resolution=30), "Resolution"),
        (dict(optimizer="sgd9000"), "sgd9000 is not in the list of choices"),
        (dict(images=["fake.png"]), "fake.png` cannot be used: it is not an image"),
        (dict(images=["truncated.png"]), "truncated.png` could not be read as an image"),
        (dict(images=["notes.txt"]), "Invalid file type"),
        (dict(images=["anim.gif"]), "anim.gif` is a GIF file: training reads PNG, JPEG and WebP only"),
        (dict(seed=2**70), "Seed must be between 0 and 4294967295, got 1.18059e\\+21"),
        (dict(seed=-1), "Seed must be between 0 and 4294967295, got -1"),
        (dict(seed=1.5), "Seed must be a whole number, got 1.5"),
        (dict(max_train_steps=None), "Training steps is empty; enter a number"),
        (dict(learning_rate=None), "Learning rate is empty; enter a number"),
        (dict(validation_steps=2.5), "Sample interval must be a whole number"),
        (dict(rank=10**400), "LoRA rank must be a finite number"),
        (dict(resolution=1e30), "Resolution must be between 32 and 2048, got 1e\\+30"),
        (dict(captions={"headers": ["image", "caption"],
                        "data": [["photo0.png", "sks dog"], ["no-such.png", "a caption for nothing"]]}),
         "The caption table names `no-such.png`, which is not among the uploaded images"),
        (dict(lora_layers="everything"), "everything is not in the list of choices"),
        (dict(conv_rank=4), "Conv rank \\(LoCon\\) adapts the ResNet convolutions on top of kohya's default layers"),
        (dict(conv_rank=-1, lora_layers="attn-ff"), "Conv rank \\(LoCon\\) must be between 0 and 512"),
        (dict(lora_alpha=-2), "LoRA alpha must be between 0 and 4096"),
        (dict(validation_split=0.9), "Held-out share must be between 0 and 0.5"),
    ],
)
def test_bad_training_input_is_refused_with_a_clear_message(app, images, kwargs, message):
    args = dict(images=images["good"][:1], instance_prompt="a photo of sks dog", max_train_steps=2,
                learning_rate=1e-4, rank=4, optimizer="adaprelora", resolution=32)
    args.update(kwargs)
    args["images"] = [handle_file(p if os.path.isabs(p) else str(images["folder"] / p)) for p in args["images"]]
    before = _lora_folders(app["root"])
    _refused(lambda: app["client"].predict(**args, api_name="/train"), message.replace(".", r"\."), app["client"])
    assert _lora_folders(app["root"]) == before, "a refused run leaves nothing behind"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=""), "Write a prompt"),
        (dict(lora="no-such-lora"), "no trained LoRA named 'no-such-lora'"),
        (dict(lora="../../etc"), "invalid LoRA name"),
        (dict(num_inference_steps=0), "Steps must be between 1"),
        (dict(seed=2**70), "Seed must be between -1 and 4294967295, got 1.18059e\\+21. -1 picks a random seed"),
        (dict(seed=-5), "Seed must be between -1 and 4294967295, got -5"),
        (dict(seed=1.5), "Seed must be a whole number, got 1.5"),
        (dict(num_inference_steps=None), "Steps is empty; enter a number"),
        (dict(guidance_scale=None), "Guidance scale is empty"),
        (dict(lora_scale=None), "LoRA scale is empty"),
        (dict(num_images=10**400), "Number of images must be a finite number"),
    ],
)
def test_bad_generation_input_is_refused_with_a_clear_message(app, kwargs, message):
    args = dict(prompt="a photo of sks dog", lora="(none)", num_inference_steps=2, seed=0)
    args.update(kwargs)
    before = set(os.listdir(os.path.join(app["root"], "generated"))) if os.path.isdir(os.path.join(app["root"], "generated")) else set()
    _refused(lambda: app["client"].predict(**args, api_name="/generate"), message, app["client"])
    after = set(os.listdir(os.path.join(app["root"], "generated"))) if os.path.isdir(os.path.join(app["root"], "generated")) else set()
    assert after == before, "a refused request writes no image"


def test_more_settings_reach_the_run_the_files_and_the_lora_table(app, tmp_path, write_images):
    """Layers, LoCon, alpha, DoRA and EMA from "More settings" (keyword parameters of /train) train a
    LoRA whose files pass the export check and whose table row names them; an upload with
    transparency trains with its alpha as the loss mask."""
    import numpy as np
    from PIL import Image

    paths = write_images(tmp_path, [(40, 48)] * 2, prefix="cut")
    rgb = np.asarray(Image.open(paths[0]).convert("RGB"))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, : rgb.shape[1] // 2, 3] = 0  # the left half transparent
    Image.fromarray(rgba, "RGBA").save(paths[0])
    client = app["client"]
    summary = client.predict([handle_file(p) for p in paths], "a photo of sks cut", 2, 1e-3, 4, "adaprelora", 32,
                             lora_name="more settings", num_samples=0, lora_layers="attn-ff", conv_rank=2,
                             lora_alpha=1, use_dora=True, use_ema=True, api_name="/train")[5]
    assert summary["status"] == "done" and summary["steps"] == 2, summary
    info = LoraStore(app["root"]).get("more-settings")
    config = info.meta["train_config"]
    assert (config["lora_layers"], config["conv_rank"], config["lora_alpha"], config["use_dora"],
            config["use_ema"], config["alpha_mask"]) == ("attn-ff", 2, 1, True, True, True), config
    verified = summary.get("verified", "")
    assert verified.startswith("verified:") and "diffusers file ok" in verified and "kohya file ok" in verified, summary
    from adaprelora.app.handlers import LORA_TABLE_HEADERS, table_row

    row = dict(zip(LORA_TABLE_HEADERS, table_row(info)))
    assert row["layers"] == "attn-ff, alpha 1, conv 2, DoRA, EMA", row
    assert "more-settings" not in client.predict("more-settings", api_name="/delete_lora")


def test_a_16_bit_grayscale_png_trains_on_its_scaled_pixels(app, tmp_path):
    """A true 16-bit PNG is accepted, staged as uploaded, and what the trainer reads from it is the
    image scaled to 8 bits (65535 -> 255), not clipped to white."""
    import numpy as np
    from PIL import Image

    from adaprelora.training.dreambooth.data import load_rgb

    wide = (np.linspace(0, 65535, 40 * 48).reshape(40, 48)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(wide).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I"), img.mode  # really 16 bits per pixel on disk
    summary = app["client"].predict([handle_file(str(path))], "a photo of sks ramp", 1, 1e-4, 4, "adamw", 32,
                                    lora_name="deep png", num_samples=0, api_name="/train")[5]
    assert summary["status"] == "done", summary
    staged = os.path.join(app["root"], "loras", "deep-png", "instance_images", "000-deep.png")
    assert open(staged, "rb").read() == path.read_bytes(), "the upload is trained as it was sent"
    seen = np.asarray(load_rgb(staged))[..., 0].astype(int)
    expected = np.round(wide.astype(np.float64) / 257.0).astype(int)  # independent reference
    assert np.abs(seen - expected).max() <= 1 and (seen == 255).mean() < 0.01, (seen == 255).mean()
    assert "deep-png" not in app["client"].predict("deep-png", api_name="/delete_lora")  # leave the root as it was


def _raw_call(url: str, api_name: str, body: str) -> str:
    """One call through Gradio's HTTP API with a JSON body as written (gradio_client cannot send
    NaN or Infinity); the event stream of its result."""
    import httpx

    event = httpx.post(f"{url}gradio_api/call/{api_name}", content=body,
                       headers={"Content-Type": "application/json"}, timeout=60).json()["event_id"]
    return httpx.get(f"{url}gradio_api/call/{api_name}/{event}", timeout=120).text


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused_by_name(app, images, value):
    import httpx

    upload = httpx.post(f"{app['url']}gradio_api/upload", files={"files": open(images["good"][0], "rb")}).json()[0]
    image = {"path": upload, "meta": {"_type": "gradio.FileData"}}
    before = _lora_folders(app["root"])
    for api_name, data, label in [
        ("train", f'[[{json.dumps(image)}], "a photo of sks dog", 2, {value}, 4, "adamw", 32, "", '
                  '{"headers": ["image", "caption"], "data": []}, "", false, "", 2, 0, 0, "attn", 0, 0, false, false, 0]', "Learning rate"),
        ("generate", f'["a photo of sks dog", "(none)", 2, 0, "", {value}, 1.0, 1]', "Guidance scale"),
        ("generate", f'["a photo of sks dog", "(none)", 2, 0, "", 7.5, {value}, 1]', "LoRA scale"),
    ]:
        stream = _raw_call(app["url"], api_name, '{"data": ' + data + "}")
        assert "event: error" in stream and f"{label} must be a finite number" in stream, stream
        assert "Traceback" not in stream, stream
    assert _lora_folders(app["root"]) == before, "a refused run leaves nothing behind"
    assert isinstance(app["client"].predict(api_name="/loras"), list), "the app keeps serving"


def test_the_app_recovers_when_its_output_folder_is_removed(tmp_path, images, tiny_sd, free_port):
    import shutil

    root = tmp_path / "out"
    demo, url = _launch(tiny_sd, str(root), free_port())
    client = Client(url, verbose=False)
    one_step = lambda name: client.predict([handle_file(images["good"][0])], "a photo of sks dog", 1, 1e-4,  # noqa: E731
                                           4, "adamw", 32, lora_name=name, num_samples=0, api_name="/train")
    try:
        shutil.rmtree(root)
        assert client.predict(api_name="/loras") == [], "the list is empty, and its folder made again"
        summary = one_step("after removal")[5]
        assert summary["status"] == "done" and os.path.isfile(root / summary["diffusers"]), summary
        assert client.predict(api_name="/loras") == ["after-removal"]

        # Removed while a run trains: the run stops with one line and leaves nothing; the app goes on.
        job = client.submit([handle_file(images["good"][0])], "a photo of sks cat", 10_000, 1e-4, 4, "adamw", 32,
                            lora_name="removed cat", validation_steps=10_000, num_samples=0, api_name="/train")
        for update in job:
            if isinstance(update, tuple) and "step 1/" in str(update[0]):
                break
        shutil.rmtree(root)
        _refused(job.result, "Training of removed-cat stopped at step \\d+: its folder .* was removed while it ran", client)
        assert client.predict(api_name="/loras") == [] and os.listdir(root / "loras") == [], "nothing looks finished"

        # A file where the output folder was: every endpoint says so in one line, and the app goes on.
        shutil.rmtree(root)
        root.write_text("not a folder")
        for call in (lambda: client.predict(api_name="/loras"), lambda: one_step("blocked"),
                     lambda: client.predict("a photo", "(none)", 1, 0, api_name="/generate")):
            with pytest.raises(AppError, match=f"{root} is a file, not a folder") as err:
                call()
            assert "Traceback" not in str(err.value) and "\n" not in str(err.value), str(err.value)
        root.unlink()
        assert client.predict(api_name="/loras") == []
        assert len(client.predict("a photo", "(none)", 1, 0, api_name="/generate")) == 1
    finally:
        demo.close()


def test_presets_fill_the_form_but_keep_a_typed_prompt(app):
    client = app["client"]
    prompt, steps, lr, rank, text_encoder, validation = client.predict("face", "", api_name="/apply_preset")
    assert (prompt, steps, rank, text_encoder) == ("a photo of sks person", 800, 16, True) and lr > 0
    kept = client.predict("style", "my own prompt of zwx", api_name="/apply_preset")
    assert kept[0] == "my own prompt of zwx" and kept[3] == 32


def test_picking_prodigy_sets_its_documented_lr_and_leaving_it_restores_the_profiles(app, tiny_sd):
    """Prodigy's lr multiplies its own step-size estimate (1.0 documented): the form's 2e-3 would
    hardly train, so picking it sets 1.0; another optimizer then gets the profile's lr back, and a
    lr the user typed for a plain optimizer is kept."""
    from adaprelora.app.defaults import profile_for
    from adaprelora.factory import DOCUMENTED_LRS

    client, profile_lr = app["client"], profile_for(tiny_sd).train.learning_rate
    assert client.predict("prodigy", 2e-3, api_name="/optimizer_lr") == DOCUMENTED_LRS["prodigy"] == 1.0
    assert client.predict("adaprelora", 1.0, api_name="/optimizer_lr") == profile_lr != 1.0
    assert client.predict("adamw", 3e-4, api_name="/optimizer_lr") == 3e-4
    # the page calls it when the user picks an optimizer, and it fills the lr field
    config = app["demo"].config
    dep = next(d for d in config["dependencies"] if d.get("api_name") == "optimizer_lr")
    ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    assert [(ids[target], event) for target, event in dep["targets"]] == [("train-optimizer", "input")]
    assert [ids[i] for i in dep["inputs"]] == ["train-optimizer", "train-lr"] and [ids[i] for i in dep["outputs"]] == ["train-lr"]


def test_delete_refuses_paths_outside_the_store(app):
    with pytest.raises(AppError, match="invalid LoRA name"):
        app["client"].predict("../output-root", api_name="/delete_lora")


def test_an_unloadable_base_model_still_opens_the_page_and_says_what_to_do(tmp_path, free_port):
    demo, url = _launch(str(tmp_path / "no-such-model"), str(tmp_path / "out"), free_port())
    try:
        client = Client(url, verbose=False)
        banner = client.predict(api_name="/base_model_status")
        assert "cannot be loaded" in banner and "--base-model" in banner, banner
        with pytest.raises(AppError, match="--base-model"):
            client.predict("a photo", api_name="/generate")
    finally:
        demo.close()


def test_a_trainer_error_is_a_clear_message_and_leaves_no_folder(tmp_path, images, free_port):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")  # passes the quick check, fails to load
    root = tmp_path / "out"
    demo, url = _launch(str(broken), str(root), free_port())
    try:
        with pytest.raises(AppError) as err:
            Client(url, verbose=False).predict([handle_file(images["good"][0])], "a photo of sks dog", 2, 1e-4, 4,
                                               "adamw", 32, num_samples=0, api_name="/train")
        assert "broken-model" in str(err.value) and "Traceback" not in str(err.value), str(err.value)
        assert os.listdir(root / "loras") == [], "a run that never trained leaves no folder"
    finally:
        demo.close()


def test_store_names_are_slugs_inside_the_output_root(tmp_path):
    store = LoraStore(str(tmp_path))
    for bad in ("../x", "a/b", ".hidden", "", "x" * 81):
        with pytest.raises(StoreError):
            store.path_for(bad)
    first = store.create("My Dog!", {})
    second = store.create("My Dog!", {})
    assert (first.name, second.name) == ("my-dog", "my-dog-2")
    with pytest.raises(StoreError, match="still training"):
        store.delete("my-dog")
    store.finish(first, "failed")
    store.delete("my-dog")
    assert [i.name for i in store.list()] == ["my-dog-2"]
    assert store.names() == [], "a run without weights is not offered for generation"
    assert LoraStore(str(tmp_path)).get("my-dog-2").status == "interrupted", "a dead run is marked on restart"


def test_only_loopback_hosts_count_as_private():
    from adaprelora.app.ui import _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.5") and not _is_loopback("example.org")


def test_auth_and_cli_arguments(tmp_path):
    assert parse_auth("me:secret:x") == ("me", "secret:x")
    for bad in ("nopass", ":pw", "user:"):
        with pytest.raises(ValueError, match="user:password"):
            parse_auth(bad)
    import importlib.util

    spec = importlib.util.spec_from_file_location("app_cli", os.path.join(os.path.dirname(__file__), "..", "app.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--output-root", str(tmp_path), "--auth", "a:b"])
    assert (args.host, args.port, args.auth, args.share) == ("127.0.0.1", 7860, ("a", "b"), False)
    from adaprelora.tiny_t2i import TINY_SD_DIR

    assert args.base_model == TINY_SD_DIR, "the built-in model is the default (it works offline)"
    with pytest.raises(SystemExit):
        module.parse_args(["--auth", "nocolon"])


def test_python_app_py_serves_the_page_on_loopback_even_without_the_default_model(tmp_path, images, free_port):
    """The real entry point, offline: the default SD 1.5 id cannot be fetched, the page opens anyway."""
    import subprocess
    import sys
    import time
    import urllib.request

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, os.path.join(root, "app.py"), "--port", str(port),
                             "--output-root", str(tmp_path / "out")],
                            cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):  # polls until the server answers; no assertion on how long it takes
            if proc.poll() is not None:
                pytest.fail(f"app.py exited early:\n{proc.stdout.read()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                time.sleep(0.25)
        else:
            pytest.fail("app.py never served the page")
        client = Client(url, verbose=False)
        banner = client.predict(api_name="/base_model_status")
        assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in banner and "--base-model" in banner, banner
        with pytest.raises(AppError, match="not an image"):
            client.predict([handle_file(str(images["folder"] / "fake.png"))], "a photo of sks dog", api_name="/train")
        uploaded = [f for _, _, files in os.walk(tmp_path / "out" / ".gradio-cache") for f in files]
        assert "fake.png" in uploaded, "Gradio's upload cache lives inside the output root"
        assert sorted(os.listdir(tmp_path)) == ["out"], "nothing is written outside the output root"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
