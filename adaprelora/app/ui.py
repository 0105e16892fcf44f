"""`build_demo()`: the page, one builder per tab (`train_tab`, `generate_tab`, `loras_tab`), then
its wiring (`wire`); `launch()` serves it.

Named endpoints, for `gradio_client`:

    /train(images, instance_prompt, max_train_steps, learning_rate, rank, optimizer, resolution,
           lora_name, captions, class_prompt, train_text_encoder, validation_prompt,
           validation_steps, seed, num_samples)           streams progress, returns when training ends
    /stop()                                               stops this session's training
    /loras() -> list[str]                                 trained LoRAs usable for generation
    /generate(prompt, lora, num_inference_steps, seed, negative_prompt, guidance_scale,
              lora_scale, num_images) -> gallery          image files
    /delete_lora(name) -> list[str]
    /resume_lora(name)                                    continues an interrupted run from its last
                                                          checkpoint; streams like /train

Training and generation share one queue with one slot ("gpu"): one job at a time, and the page
shows each waiting user their position. Every input is checked before anything starts: a number
sent empty (None), non-finite, not whole where it must be or out of range (seeds: 0 to 2**32 - 1;
-1 for a random one in /generate), an image that is not PNG, JPEG or WebP (the formats
`train_dreambooth.py` reads), or a caption row naming no uploaded image is one message naming it.
"""
from __future__ import annotations

import functools
import inspect
import ipaddress
import os
from dataclasses import dataclass
from typing import Callable, Optional

import gradio as gr

from adaprelora.training.dreambooth.config import LORA_LAYERS

from .defaults import DEFAULT_BASE_MODEL, PRESET_FIELDS, ModelProfile
from .form import TrainForm, form_endpoint
from .generate import BaseModel
from .handlers import LORA_TABLE_HEADERS, NO_LORA, AppHandlers, table_row
from .store import LoraStore

GPU_QUEUE = "gpu"
# In the page only (API calls skip it): ask before deleting; a cancelled dialog sends no name.
_CONFIRM_DELETE = "(name) => (name && confirm(`Delete the LoRA ${name} and all its files?`)) ? name : null"


def keyed(fn: Callable, outputs: dict[str, gr.components.Component]) -> dict:
    """`fn=` and `outputs=` of an event whose handler returns (or yields) {output name: value}.

    The handler names what it updates; the names are mapped to the components here, and outputs it
    leaves out are not updated. The wrapper keeps `fn`'s signature, so the API's parameter names and
    defaults (and `gr.Progress`) are the handler's own.
    """
    def to_components(update: dict) -> dict:
        return {outputs[name]: value for name, value in update.items()}

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for update in fn(*args, **kwargs):
                yield to_components(update)
    else:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return to_components(fn(*args, **kwargs))
    return {"fn": wrapper, "outputs": list(outputs.values())}


@dataclass
class TrainTab:
    """The Train tab's components: `fields` by `TrainForm` field name (the `/train` inputs), `run`
    by output name (what `/train` and `/resume_lora` update), and its other controls."""

    fields: dict[str, gr.components.Component]
    run: dict[str, gr.components.Component]
    preview: gr.Gallery
    preset: gr.Radio
    example_button: Optional[gr.Button]
    train_button: gr.Button
    stop_button: gr.Button

    def form_inputs(self) -> list[gr.components.Component]:
        """The components behind the form's fields, in the `/train` API's order."""
        missing = [name for name in TrainForm.names() if name not in self.fields]
        if missing:
            raise ValueError(f"the Train tab's layout has no component for the form field(s) {missing}")
        return [self.fields[name] for name in TrainForm.names()]


@dataclass
class GenerateTab:
    inputs: list[gr.components.Component]  # in the `/generate` API's order
    lora: gr.Dropdown
    refresh_button: gr.Button
    button: gr.Button
    gallery: gr.Gallery


@dataclass
class LorasTab:
    table: gr.Dataframe
    select: gr.Dropdown
    refresh_button: gr.Button
    delete_button: gr.Button
    resume_button: gr.Button
    details: dict[str, gr.components.Component]  # what `/lora_details` updates, by output name


def build_demo(
    base_model: str = DEFAULT_BASE_MODEL,
    output_root: str = "outputs",
    *,
    check_base_model_in_background: bool = True,
) -> gr.Blocks:
    """The app over `base_model` (Hub id or local diffusers folder), storing LoRAs in `output_root`.

    Files the app returns (weights, samples, generated images) live in `output_root`; serve it
    with `launch()`, which allows that folder (or keep it inside the working or temp folder).
    """
    from adaprelora import available_optimizers

    store = LoraStore(output_root)
    base = BaseModel(base_model, check_in_background=check_base_model_in_background)
    h = AppHandlers(store, base)
    infos = store.list()
    ready = [info.name for info in infos if info.ready]

    with gr.Blocks(title="adaprelora: DreamBooth LoRA trainer") as demo:
        gr.Markdown("# adaprelora · DreamBooth LoRA\nUpload photos of a subject, train a LoRA, watch it "
                    "learn, then generate images of it.")
        banner = gr.Markdown(f"Base model: `{base_model}` ({h.profile.family}; checking that it can be loaded...)",
                             elem_id="base-model-status")
        job = gr.State(None)
        lora_names = gr.JSON(value=ready, visible=False)
        with gr.Tabs():
            train = train_tab(h.profile, available_optimizers())
            generate = generate_tab(h.profile, ready)
            loras = loras_tab(infos)
        wire(demo, h, train, generate, loras, job=job, lora_names=lora_names, banner=banner)
    demo.adaprelora_output_root = store.output_root
    return demo


# -- layout: one builder per tab -------------------------------------------------------------------
def train_tab(profile: ModelProfile, optimizers: list[str]) -> TrainTab:
    """Upload, settings (each component named as its `TrainForm` field, starting at the profile's
    value), and the run's progress and files."""
    start = TrainForm.from_profile(profile.train)
    f: dict[str, gr.components.Component] = {}
    with gr.Tab("Train", id="train"):
        with gr.Row():
            with gr.Column(scale=1):
                f["images"] = gr.File(label="Images of your subject (PNG, JPEG, WebP)", file_count="multiple",
                                      file_types=["image"], elem_id="train-images")
                preview = gr.Gallery(label="Preview", columns=6, height=160, interactive=False,
                                     elem_id="train-preview")
                f["captions"] = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], type="array",
                                             interactive=True, column_count=2,
                                             label="Captions (optional): one per image, replaces the prompt",
                                             elem_id="train-captions")
                example_button = None
                if profile.builtin:
                    example_button = gr.Button("Try the example: 5 pictures of a red heart (a new shape)",
                                               size="sm", elem_id="example-button")
                preset = gr.Radio(list(profile.presets), label="Preset", elem_id="train-preset")
                f["instance_prompt"] = gr.Textbox(label="Instance prompt (with a trigger word)",
                                                  placeholder=profile.prompt_hint, elem_id="instance-prompt")
                f["lora_name"] = gr.Textbox(label="LoRA name (optional)", placeholder="my-dog", elem_id="lora-name")
                # Numbers keep what was typed (precision=None): the form says when one is not whole.
                with gr.Row():
                    f["max_train_steps"] = gr.Number(start.max_train_steps, label="Training steps",
                                                     elem_id="train-steps")
                    f["learning_rate"] = gr.Number(start.learning_rate, label="Learning rate", elem_id="train-lr")
                    f["rank"] = gr.Number(start.rank, label="LoRA rank", elem_id="train-rank")
                with gr.Row():
                    f["optimizer"] = gr.Dropdown(optimizers, value=start.optimizer, label="Optimizer",
                                                 elem_id="train-optimizer")
                    f["resolution"] = gr.Number(start.resolution, label="Resolution (multiple of 8)",
                                                elem_id="train-resolution")
                with gr.Accordion("More settings", open=False):
                    f["class_prompt"] = gr.Textbox(start.class_prompt or "",
                                                   label="Class prompt (turns on prior preservation)",
                                                   placeholder="a photo of a dog")
                    f["train_text_encoder"] = gr.Checkbox(start.train_text_encoder, label="Train the text encoder too")
                    f["validation_prompt"] = gr.Textbox(label="Sample prompt (empty: the instance prompt)",
                                                        elem_id="validation-prompt")
                    with gr.Row():
                        f["validation_steps"] = gr.Number(start.validation_steps, label="Sample every N steps",
                                                          elem_id="validation-steps")
                        f["num_samples"] = gr.Number(start.num_samples, label="Sample images each time")
                        f["seed"] = gr.Number(start.seed, label="Seed")
                    with gr.Row():
                        f["lora_layers"] = gr.Dropdown(list(LORA_LAYERS), value=start.lora_layers,
                                                       label="Layers (attn-ff: kohya's default set)",
                                                       elem_id="train-lora-layers")
                        f["conv_rank"] = gr.Number(start.conv_rank, label="Conv rank (LoCon; 0: off)",
                                                   elem_id="train-conv-rank")
                        f["lora_alpha"] = gr.Number(start.lora_alpha, label="LoRA alpha (0: the rank)",
                                                    elem_id="train-lora-alpha")
                    with gr.Row():
                        f["use_dora"] = gr.Checkbox(start.use_dora, label="DoRA", elem_id="train-use-dora")
                        f["use_ema"] = gr.Checkbox(start.use_ema, label="EMA of the weights (files and samples)",
                                                   elem_id="train-use-ema")
                        f["validation_split"] = gr.Number(start.validation_split,
                                                          label="Held out for the validation loss (share; 0: off)",
                                                          elem_id="train-validation-split")
                    gr.Markdown("PNGs with transparency train with their alpha as a mask: transparent parts are "
                                "not learned.")
            with gr.Column(scale=1):
                with gr.Row():
                    train_button = gr.Button("Train", variant="primary", elem_id="train-button")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop-button")
                run = {"status": gr.Markdown("Upload images, write a prompt and press **Train**.",
                                             elem_id="train-status"),
                       "loss_plot": gr.LinePlot(x="step", y="loss", color="curve", label="Loss", elem_id="loss-plot"),
                       "samples": gr.Gallery(label="Samples", columns=4, height=260, elem_id="train-samples",
                                             buttons=["download", "download_all", "fullscreen"])}
                with gr.Row():
                    run["diffusers"] = gr.DownloadButton("Download diffusers LoRA", visible=False,
                                                         elem_id="download-diffusers")
                    run["kohya"] = gr.DownloadButton("Download kohya / A1111 LoRA", visible=False,
                                                     elem_id="download-kohya")
                with gr.Accordion("Run summary", open=False):
                    run["summary"] = gr.JSON(label="Run summary (paths inside the output folder)",
                                             elem_id="train-summary")
    return TrainTab(fields=f, run=run, preview=preview, preset=preset, example_button=example_button,
                    train_button=train_button, stop_button=stop_button)


def generate_tab(profile: ModelProfile, ready: list[str]) -> GenerateTab:
    """Prompt, LoRA and sampling settings (starting at the profile's), and the images."""
    start = profile.generate
    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            with gr.Column(scale=1):
                lora = gr.Dropdown([NO_LORA] + ready, value=NO_LORA, label="LoRA", allow_custom_value=True,
                                   elem_id="gen-lora")
                refresh_button = gr.Button("Refresh list", size="sm")
                prompt = gr.Textbox(label="Prompt", placeholder=profile.generate_hint, elem_id="gen-prompt")
                negative = gr.Textbox(label="Negative prompt")
                with gr.Row():
                    steps = gr.Number(start.num_inference_steps, label="Steps", elem_id="gen-steps")
                    guidance = gr.Number(start.guidance_scale, label="Guidance scale")
                with gr.Row():
                    seed = gr.Number(start.seed, label="Seed (-1: random)")
                    scale = gr.Slider(0, 2, value=start.lora_scale, step=0.05, label="LoRA scale")
                    count = gr.Number(start.num_images, label="Images")
                button = gr.Button("Generate", variant="primary", elem_id="gen-button")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Images", columns=2, height=420, format="png",
                                     buttons=["download", "download_all", "fullscreen"], elem_id="gen-gallery")
    return GenerateTab(inputs=[prompt, lora, steps, seed, negative, guidance, scale, count], lora=lora,
                       refresh_button=refresh_button, button=button, gallery=gallery)


def loras_tab(infos: list) -> LorasTab:
    """The trained LoRAs: table, selection, actions, and the chosen one's settings and files."""
    with gr.Tab("LoRAs", id="loras"):
        table = gr.Dataframe(value=[table_row(i) for i in infos], headers=LORA_TABLE_HEADERS, interactive=False,
                             label="Trained LoRAs", elem_id="lora-table")
        with gr.Row():
            select = gr.Dropdown([i.name for i in infos], value=infos[0].name if infos else None, label="LoRA",
                                 allow_custom_value=True, elem_id="lora-select")
            refresh_button = gr.Button("Refresh", size="sm")
            delete_button = gr.Button("Delete", variant="stop", size="sm", elem_id="delete-button")
            resume_button = gr.Button("Resume", size="sm", elem_id="resume-button")
        with gr.Row():
            with gr.Column():
                details = {"details": gr.JSON(label="Settings", elem_id="lora-details")}
            with gr.Column():
                details["lora_samples"] = gr.Gallery(label="Samples", columns=4, height=260)
                with gr.Row():
                    details["lora_diffusers"] = gr.DownloadButton("Download diffusers LoRA", visible=False)
                    details["lora_kohya"] = gr.DownloadButton("Download kohya / A1111 LoRA", visible=False)
    return LorasTab(table=table, select=select, refresh_button=refresh_button, delete_button=delete_button,
                    resume_button=resume_button, details=details)


# -- wiring ----------------------------------------------------------------------------------------
def wire(demo: gr.Blocks, h: AppHandlers, train: TrainTab, generate: GenerateTab, loras: LorasTab, *,
         job: gr.State, lora_names: gr.JSON, banner: gr.Markdown) -> None:
    """Every event and its `api_name` (the endpoints listed at the top of this module)."""
    widgets = dict(inputs=[loras.select], api_visibility="undocumented",
                   **keyed(h.lora_widgets, {"table": loras.table, "gen_lora": generate.lora,
                                            "lora_select": loras.select}))
    # What a run updates, from /train and from /resume_lora alike.
    run_outputs = dict(train.run, job=job)

    train.fields["images"].change(inputs=[train.fields["images"]], api_name="preview_uploads",
                                  api_visibility="undocumented",
                                  **keyed(h.preview_uploads, {"preview": train.preview,
                                                              "captions": train.fields["captions"]}))
    train.fields["optimizer"].input(h.optimizer_lr, inputs=[train.fields["optimizer"], train.fields["learning_rate"]],
                                    outputs=[train.fields["learning_rate"]], api_name="optimizer_lr",
                                    api_visibility="undocumented")
    preset_outputs = {name: train.fields[name] for name in PRESET_FIELDS}
    train.preset.change(inputs=[train.preset, train.fields["instance_prompt"]], api_name="apply_preset",
                        api_visibility="undocumented", **keyed(h.apply_preset, preset_outputs))
    if train.example_button is not None:
        train.example_button.click(api_name="load_example", api_visibility="undocumented",
                                   **keyed(h.load_example, dict(preset_outputs, images=train.fields["images"],
                                                                preset=train.preset,
                                                                lora_name=train.fields["lora_name"])))

    train.train_button.click(inputs=train.form_inputs(), api_name="train", concurrency_limit=1,
                             concurrency_id=GPU_QUEUE,
                             **keyed(form_endpoint(TrainForm, h.train, "train"), run_outputs),
                             ).then(api_name="refresh_after_train", **widgets)
    loras.resume_button.click(  # an interrupted run: progress and files appear in the Train tab
        inputs=[loras.select], api_name="resume_lora", concurrency_limit=1, concurrency_id=GPU_QUEUE,
        **keyed(h.resume_lora, run_outputs),
    ).then(api_name="refresh_after_resume", **widgets)
    train.stop_button.click(h.stop, inputs=[job], outputs=[train.run["status"]], api_name="stop",
                            concurrency_limit=None, concurrency_id="stop")

    # Unprocessed inputs: a value sent empty (None) or out of range reaches the handler, which says
    # which field is wrong, instead of failing inside a component's conversion.
    generate.button.click(h.generate, inputs=generate.inputs, outputs=[generate.gallery], api_name="generate",
                          concurrency_limit=1, concurrency_id=GPU_QUEUE, preprocess=False)

    gr.on([loras.refresh_button.click, generate.refresh_button.click], h.loras, outputs=[lora_names],
          api_name="loras").then(api_name="lora_widgets", **widgets)
    loras.select.change(inputs=[loras.select], api_name="lora_details", **keyed(h.lora_details, loras.details))
    loras.delete_button.click(h.delete_lora, inputs=[loras.select], outputs=[lora_names], api_name="delete_lora",
                              js=_CONFIRM_DELETE).then(api_name="refresh_after_delete", **widgets)

    demo.load(h.base_model_status, outputs=[banner], api_name="base_model_status", api_visibility="undocumented")
    demo.load(api_name="lora_widgets_on_load", **widgets).then(
        inputs=[loras.select], api_name="lora_details_on_load", api_visibility="undocumented",
        **keyed(h.lora_details, loras.details),
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def launch(
    demo: gr.Blocks,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    auth: Optional[tuple[str, str]] = None,
    output_root: Optional[str] = None,
    **kwargs,
):
    """Queue and serve `demo`; warns when the page is reachable beyond this machine."""
    if share:
        print("warning: --share makes the page reachable by anyone with the public link"
              + ("" if auth else "; consider --auth user:password"))
    if not _is_loopback(host):
        print(f"warning: --host {host} makes the page reachable from other machines"
              + ("" if auth else "; consider --auth user:password"))
    root = output_root or getattr(demo, "adaprelora_output_root", None)
    return demo.queue(max_size=64).launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        allowed_paths=[os.path.realpath(root)] if root else None,
        **kwargs,
    )
