"""`build_demo()`: the page (Train, Generate and LoRAs tabs), then its wiring; `launch()` serves it.

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
shows each waiting user their position.
"""
from __future__ import annotations

import functools
import inspect
import ipaddress
import os
from typing import Callable, Optional

import gradio as gr

from .defaults import DEFAULT_BASE_MODEL
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
    optimizers = available_optimizers()
    profile = h.profile
    T, G = profile.train, profile.generate
    infos = store.list()
    ready = [info.name for info in infos if info.ready]

    with gr.Blocks(title="adaprelora: DreamBooth LoRA trainer") as demo:
        # ---------------------------------------------------------------- layout
        gr.Markdown("# adaprelora · DreamBooth LoRA\nUpload photos of a subject, train a LoRA, watch it "
                    "learn, then generate images of it.")
        banner = gr.Markdown(f"Base model: `{base_model}` ({profile.family}; checking that it can be loaded...)",
                             elem_id="base-model-status")
        job = gr.State(None)
        lora_names = gr.JSON(value=ready, visible=False)

        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    with gr.Column(scale=1):
                        images = gr.File(label="Images of your subject (PNG, JPEG, WebP)", file_count="multiple",
                                         file_types=["image"], elem_id="train-images")
                        preview = gr.Gallery(label="Preview", columns=6, height=160, interactive=False,
                                             elem_id="train-preview")
                        captions = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"],
                                                type="array", interactive=True, column_count=2,
                                                label="Captions (optional): one per image, replaces the prompt",
                                                elem_id="train-captions")
                        if profile.builtin:
                            example_btn = gr.Button("Try the example: 5 pictures of a red heart (a new shape)",
                                                    size="sm", elem_id="example-button")
                        preset = gr.Radio(list(profile.presets), label="Preset", elem_id="train-preset")
                        instance_prompt = gr.Textbox(label="Instance prompt (with a trigger word)",
                                                     placeholder=profile.prompt_hint, elem_id="instance-prompt")
                        lora_name = gr.Textbox(label="LoRA name (optional)", placeholder="my-dog",
                                               elem_id="lora-name")
                        with gr.Row():
                            steps = gr.Number(T["max_train_steps"], label="Training steps", precision=0,
                                              elem_id="train-steps")
                            lr = gr.Number(T["learning_rate"], label="Learning rate", elem_id="train-lr")
                            rank = gr.Number(T["rank"], label="LoRA rank", precision=0, elem_id="train-rank")
                        with gr.Row():
                            optimizer = gr.Dropdown(optimizers, value=T["optimizer"], label="Optimizer",
                                                    elem_id="train-optimizer")
                            resolution = gr.Number(T["resolution"], label="Resolution (multiple of 8)", precision=0,
                                                   elem_id="train-resolution")
                        with gr.Accordion("More settings", open=False):
                            class_prompt = gr.Textbox(T.get("class_prompt") or "",
                                                      label="Class prompt (turns on prior preservation)",
                                                      placeholder="a photo of a dog")
                            train_text_encoder = gr.Checkbox(T.get("train_text_encoder", False),
                                                             label="Train the text encoder too")
                            validation_prompt = gr.Textbox(label="Sample prompt (empty: the instance prompt)",
                                                           elem_id="validation-prompt")
                            with gr.Row():
                                validation_steps = gr.Number(T["validation_steps"], label="Sample every N steps",
                                                             precision=0, elem_id="validation-steps")
                                num_samples = gr.Number(T["num_samples"], label="Sample images each time",
                                                        precision=0)
                                seed = gr.Number(T["seed"], label="Seed", precision=0)
                    with gr.Column(scale=1):
                        with gr.Row():
                            train_btn = gr.Button("Train", variant="primary", elem_id="train-button")
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-button")
                        status = gr.Markdown("Upload images, write a prompt and press **Train**.",
                                             elem_id="train-status")
                        loss_plot = gr.LinePlot(x="step", y="loss", color="curve", label="Loss",
                                                elem_id="loss-plot")
                        samples = gr.Gallery(label="Samples", columns=4, height=260, elem_id="train-samples",
                                             buttons=["download", "download_all", "fullscreen"])
                        with gr.Row():
                            dl_diffusers = gr.DownloadButton("Download diffusers LoRA", visible=False,
                                                             elem_id="download-diffusers")
                            dl_kohya = gr.DownloadButton("Download kohya / A1111 LoRA", visible=False,
                                                         elem_id="download-kohya")
                        with gr.Accordion("Run summary", open=False):
                            summary = gr.JSON(label="Run summary (paths inside the output folder)",
                                              elem_id="train-summary")

            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=1):
                        gen_lora = gr.Dropdown([NO_LORA] + ready, value=NO_LORA, label="LoRA",
                                               allow_custom_value=True, elem_id="gen-lora")
                        gen_refresh = gr.Button("Refresh list", size="sm")
                        gen_prompt = gr.Textbox(label="Prompt", placeholder=profile.generate_hint,
                                                elem_id="gen-prompt")
                        gen_negative = gr.Textbox(label="Negative prompt")
                        with gr.Row():
                            gen_steps = gr.Number(G["num_inference_steps"], label="Steps", precision=0,
                                                  elem_id="gen-steps")
                            gen_guidance = gr.Number(G["guidance_scale"], label="Guidance scale")
                        with gr.Row():
                            gen_seed = gr.Number(G["seed"], label="Seed (-1: random)", precision=0)
                            gen_scale = gr.Slider(0, 2, value=G["lora_scale"], step=0.05, label="LoRA scale")
                            gen_count = gr.Number(G["num_images"], label="Images", precision=0)
                        gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-button")
                    with gr.Column(scale=1):
                        gallery = gr.Gallery(label="Images", columns=2, height=420, format="png",
                                             buttons=["download", "download_all", "fullscreen"],
                                             elem_id="gen-gallery")

            with gr.Tab("LoRAs", id="loras"):
                table = gr.Dataframe(value=[table_row(i) for i in infos], headers=LORA_TABLE_HEADERS,
                                     interactive=False, label="Trained LoRAs", elem_id="lora-table")
                with gr.Row():
                    lora_select = gr.Dropdown([i.name for i in infos], value=infos[0].name if infos else None,
                                              label="LoRA", allow_custom_value=True, elem_id="lora-select")
                    refresh_btn = gr.Button("Refresh", size="sm")
                    delete_btn = gr.Button("Delete", variant="stop", size="sm", elem_id="delete-button")
                    resume_btn = gr.Button("Resume", size="sm", elem_id="resume-button")
                with gr.Row():
                    with gr.Column():
                        details = gr.JSON(label="Settings", elem_id="lora-details")
                    with gr.Column():
                        lora_samples = gr.Gallery(label="Samples", columns=4, height=260)
                        with gr.Row():
                            lora_dl_diffusers = gr.DownloadButton("Download diffusers LoRA", visible=False)
                            lora_dl_kohya = gr.DownloadButton("Download kohya / A1111 LoRA", visible=False)

        # ---------------------------------------------------------------- wiring
        widgets = dict(inputs=[lora_select], api_visibility="undocumented",
                       **keyed(h.lora_widgets, {"table": table, "gen_lora": gen_lora, "lora_select": lora_select}))
        details_outputs = {"details": details, "lora_samples": lora_samples, "lora_diffusers": lora_dl_diffusers,
                           "lora_kohya": lora_dl_kohya}

        images.change(inputs=[images], api_name="preview_uploads", api_visibility="undocumented",
                      **keyed(h.preview_uploads, {"preview": preview, "captions": captions}))
        preset_outputs = {"instance_prompt": instance_prompt, "max_train_steps": steps, "learning_rate": lr,
                          "rank": rank, "train_text_encoder": train_text_encoder,
                          "validation_prompt": validation_prompt}
        preset.change(inputs=[preset, instance_prompt], api_name="apply_preset", api_visibility="undocumented",
                      **keyed(h.apply_preset, preset_outputs))
        if profile.builtin:
            example_btn.click(api_name="load_example", api_visibility="undocumented",
                              **keyed(h.load_example, dict(preset_outputs, images=images, preset=preset,
                                                           lora_name=lora_name)))

        train_event = train_btn.click(
            inputs=[images, instance_prompt, steps, lr, rank, optimizer, resolution, lora_name, captions,
                    class_prompt, train_text_encoder, validation_prompt, validation_steps, seed, num_samples],
            api_name="train", concurrency_limit=1, concurrency_id=GPU_QUEUE,
            **keyed(h.train, {"status": status, "loss_plot": loss_plot, "samples": samples, "diffusers": dl_diffusers,
                              "kohya": dl_kohya, "summary": summary, "job": job}),
        )
        train_event.then(api_name="refresh_after_train", **widgets)
        resume_btn.click(  # an interrupted run: progress and files appear in the Train tab
            inputs=[lora_select], api_name="resume_lora", concurrency_limit=1, concurrency_id=GPU_QUEUE,
            **keyed(h.resume_lora, {"status": status, "loss_plot": loss_plot, "samples": samples,
                                    "diffusers": dl_diffusers, "kohya": dl_kohya, "summary": summary, "job": job}),
        ).then(api_name="refresh_after_resume", **widgets)
        stop_btn.click(h.stop, inputs=[job], outputs=[status], api_name="stop",
                       concurrency_limit=None, concurrency_id="stop")

        gen_btn.click(
            h.generate,
            inputs=[gen_prompt, gen_lora, gen_steps, gen_seed, gen_negative, gen_guidance, gen_scale, gen_count],
            outputs=[gallery], api_name="generate", concurrency_limit=1, concurrency_id=GPU_QUEUE,
        )

        gr.on([refresh_btn.click, gen_refresh.click], h.loras, outputs=[lora_names], api_name="loras").then(
            api_name="lora_widgets", **widgets
        )
        lora_select.change(inputs=[lora_select], api_name="lora_details", **keyed(h.lora_details, details_outputs))
        delete_btn.click(h.delete_lora, inputs=[lora_select], outputs=[lora_names], api_name="delete_lora",
                         js=_CONFIRM_DELETE).then(
            api_name="refresh_after_delete", **widgets
        )

        demo.load(h.base_model_status, outputs=[banner], api_name="base_model_status",
                  api_visibility="undocumented")
        demo.load(api_name="lora_widgets_on_load", **widgets).then(
            inputs=[lora_select], api_name="lora_details_on_load", api_visibility="undocumented",
            **keyed(h.lora_details, details_outputs),
        )
    demo.adaprelora_output_root = store.output_root
    return demo


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
