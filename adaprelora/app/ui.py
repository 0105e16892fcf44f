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

Training and generation share one queue with one slot ("gpu"): one job at a time, and the page
shows each waiting user their position.
"""
from __future__ import annotations

import ipaddress
import os
from typing import Optional

import gradio as gr

from . import DEFAULT_BASE_MODEL
from .generate import BaseModel
from .handlers import LORA_TABLE_HEADERS, NO_LORA, PRESETS, AppHandlers
from .store import LoraStore

GPU_QUEUE = "gpu"
# In the page only (API calls skip it): ask before deleting; a cancelled dialog sends no name.
_CONFIRM_DELETE = "(name) => (name && confirm(`Delete the LoRA ${name} and all its files?`)) ? name : null"


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
    infos = store.list()
    ready = [info.name for info in infos if info.ready]

    with gr.Blocks(title="adaprelora: DreamBooth LoRA trainer") as demo:
        # ---------------------------------------------------------------- layout
        gr.Markdown("# adaprelora · DreamBooth LoRA\nUpload photos of a subject, train a LoRA, watch it "
                    "learn, then generate images of it.")
        banner = gr.Markdown(f"Base model: `{base_model}` (checking that it can be loaded...)", elem_id="base-model-status")
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
                        preset = gr.Radio(list(PRESETS), label="Preset", elem_id="train-preset")
                        instance_prompt = gr.Textbox(label="Instance prompt (with a trigger word)",
                                                     placeholder="a photo of sks dog", elem_id="instance-prompt")
                        lora_name = gr.Textbox(label="LoRA name (optional)", placeholder="my-dog",
                                               elem_id="lora-name")
                        with gr.Row():
                            steps = gr.Number(500, label="Training steps", precision=0, elem_id="train-steps")
                            lr = gr.Number(1e-4, label="Learning rate", elem_id="train-lr")
                            rank = gr.Number(8, label="LoRA rank", precision=0, elem_id="train-rank")
                        with gr.Row():
                            optimizer = gr.Dropdown(optimizers, value=optimizers[0], label="Optimizer",
                                                    elem_id="train-optimizer")
                            resolution = gr.Number(512, label="Resolution (multiple of 8)", precision=0,
                                                   elem_id="train-resolution")
                        with gr.Accordion("More settings", open=False):
                            class_prompt = gr.Textbox(label="Class prompt (turns on prior preservation)",
                                                      placeholder="a photo of a dog")
                            train_text_encoder = gr.Checkbox(False, label="Train the text encoder too")
                            validation_prompt = gr.Textbox(label="Sample prompt (empty: the instance prompt)",
                                                           elem_id="validation-prompt")
                            with gr.Row():
                                validation_steps = gr.Number(100, label="Sample every N steps", precision=0,
                                                             elem_id="validation-steps")
                                num_samples = gr.Number(2, label="Sample images each time", precision=0)
                                seed = gr.Number(0, label="Seed", precision=0)
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
                        gen_prompt = gr.Textbox(label="Prompt", placeholder="a photo of sks dog in a bucket",
                                                elem_id="gen-prompt")
                        gen_negative = gr.Textbox(label="Negative prompt")
                        with gr.Row():
                            gen_steps = gr.Number(30, label="Steps", precision=0, elem_id="gen-steps")
                            gen_guidance = gr.Number(7.5, label="Guidance scale")
                        with gr.Row():
                            gen_seed = gr.Number(0, label="Seed (-1: random)", precision=0)
                            gen_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA scale")
                            gen_count = gr.Number(1, label="Images", precision=0)
                        gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-button")
                    with gr.Column(scale=1):
                        gallery = gr.Gallery(label="Images", columns=2, height=420, format="png",
                                             buttons=["download", "download_all", "fullscreen"],
                                             elem_id="gen-gallery")

            with gr.Tab("LoRAs", id="loras"):
                table = gr.Dataframe(value=[h._table_row(i) for i in infos], headers=LORA_TABLE_HEADERS,
                                     interactive=False, label="Trained LoRAs", elem_id="lora-table")
                with gr.Row():
                    lora_select = gr.Dropdown([i.name for i in infos], value=infos[0].name if infos else None,
                                              label="LoRA", allow_custom_value=True, elem_id="lora-select")
                    refresh_btn = gr.Button("Refresh", size="sm")
                    delete_btn = gr.Button("Delete", variant="stop", size="sm", elem_id="delete-button")
                with gr.Row():
                    with gr.Column():
                        details = gr.JSON(label="Settings", elem_id="lora-details")
                    with gr.Column():
                        lora_samples = gr.Gallery(label="Samples", columns=4, height=260)
                        with gr.Row():
                            lora_dl_diffusers = gr.DownloadButton("Download diffusers LoRA", visible=False)
                            lora_dl_kohya = gr.DownloadButton("Download kohya / A1111 LoRA", visible=False)

        # ---------------------------------------------------------------- wiring
        widgets = dict(fn=h.lora_widgets, inputs=[lora_select], outputs=[table, gen_lora, lora_select],
                       api_visibility="undocumented")

        images.change(h.preview_uploads, inputs=[images], outputs=[preview, captions],
                      api_name="preview_uploads", api_visibility="undocumented")
        preset.change(h.apply_preset, inputs=[preset, instance_prompt],
                      outputs=[instance_prompt, steps, lr, rank, train_text_encoder, validation_prompt],
                      api_name="apply_preset", api_visibility="undocumented")

        train_event = train_btn.click(
            h.train,
            inputs=[images, instance_prompt, steps, lr, rank, optimizer, resolution, lora_name, captions,
                    class_prompt, train_text_encoder, validation_prompt, validation_steps, seed, num_samples],
            outputs=[status, loss_plot, samples, dl_diffusers, dl_kohya, summary, job],
            api_name="train", concurrency_limit=1, concurrency_id=GPU_QUEUE,
        )
        train_event.then(api_name="refresh_after_train", **widgets)
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
        lora_select.change(h.lora_details, inputs=[lora_select],
                           outputs=[details, lora_samples, lora_dl_diffusers, lora_dl_kohya],
                           api_name="lora_details")
        delete_btn.click(h.delete_lora, inputs=[lora_select], outputs=[lora_names], api_name="delete_lora",
                         js=_CONFIRM_DELETE).then(
            api_name="refresh_after_delete", **widgets
        )

        demo.load(h.base_model_status, outputs=[banner], api_name="base_model_status",
                  api_visibility="undocumented")
        demo.load(api_name="lora_widgets_on_load", **widgets).then(
            h.lora_details, inputs=[lora_select], outputs=[details, lora_samples, lora_dl_diffusers, lora_dl_kohya],
            api_name="lora_details_on_load", api_visibility="undocumented",
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
