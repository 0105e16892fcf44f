#!/usr/bin/env python
"""DreamBooth LoRA for Stable Diffusion 1.x/2.x and SDXL, trained with AdaPreLoRA (or any optimizer by name).

    accelerate launch train_dreambooth.py \
        --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \
        --instance_data_dir dog --instance_prompt "a photo of sks dog" \
        --output_dir lora-dog --max_train_steps 400 --validation_prompt "sks dog on a beach"

Flag names and defaults follow diffusers' examples/dreambooth/train_dreambooth_lora.py (and its SDXL
sibling for the SDXL-only ones); the bucket and caching flags are kohya's. The work is
done by `adaprelora.training.dreambooth.train()`, which the Gradio app drives as well.
"""
from __future__ import annotations

from adaprelora import available_optimizers
from adaprelora.training.dreambooth.config import (
    INTERPOLATION_MODES,
    LORA_LAYERS,
    MIXED_PRECISION,
    PRIOR_GENERATION_PRECISION,
    REPORT_TO,
    TrainConfig,
)
from adaprelora.training.ema import EMA_WARMUPS
from adaprelora.training.errors import UserErrorArgumentParser, run_cli
from adaprelora.training.options import LR_SCHEDULERS, ConfigFlags, parse_optimizer_args

OPTIMIZERS = available_optimizers()


def build_parser() -> UserErrorArgumentParser:
    """The command line: diffusers' flag names, each default read from `TrainConfig`'s field."""
    parser = UserErrorArgumentParser(description="DreamBooth LoRA training with the AdaPreLoRA optimizer.")
    flag = ConfigFlags(parser, TrainConfig).add
    # Model
    flag("pretrained_model_name_or_path", type=str, required=True,
        help="Hub id or local folder of a Stable Diffusion 1.x/2.x or SDXL pipeline (told apart by model_index.json).")
    flag("revision", type=str, help="Revision (branch, tag or commit) of the pretrained model.")
    flag("variant", type=str, help="Variant of the model files, e.g. fp16.")
    flag("pretrained_vae_model_name_or_path", type=str,
        help="A VAE to use instead of the model's own (e.g. an fp16-safe SDXL VAE): Hub id or folder.")
    # Data
    flag("instance_data_dir", type=str,
        help="Folder of PNG/JPEG/WebP training images; an optional <image>.txt next to an image is its caption. "
             "Required unless --dataset_config is given.")
    flag("instance_prompt", type=str,
        help="Prompt with the identifier of the instance, e.g. 'a photo of sks dog'. Required unless every "
             "image has a caption file.")
    flag("class_data_dir", type=str, help="Folder of class images (prior preservation).")
    flag("class_prompt", type=str, help="Prompt of the class images, e.g. 'a photo of a dog'.")
    flag("with_prior_preservation", action="store_true", help="Add the prior-preservation loss.")
    flag("prior_loss_weight", type=float, help="Weight of the prior-preservation loss.")
    flag("class_caption_dropout_rate", type=float,
        help="Share of steps a class image is trained with the empty prompt (with prior preservation): keeps "
             "the unconditional prediction that guidance subtracts where the base model had it; 0.2 on the "
             "built-in model.")
    flag("caption_dropout_rate", type=float,
        help="Share of steps an instance image is trained with the empty prompt (kohya's flag).")
    # kohya dataset configs and caption shuffling
    flag("dataset_config", type=str, metavar="FILE.toml",
        help="kohya sd-scripts dataset config ([general], [[datasets]], [[datasets.subsets]] with image_dir, "
             "class_tokens, num_repeats, is_reg, ...): several concepts and regularisation images in one run, "
             "instead of --instance_data_dir/--instance_prompt and the class-image flags (docs/dreambooth.md).")
    flag("shuffle_caption", action="store_true",
        help="Shuffle the comma-separated tags of each caption every step (kohya's flag), seeded by --seed.")
    flag("keep_tokens", type=int, metavar="N",
        help="With --shuffle_caption: keep the first N tags in place.")
    flag("caption_separator", type=str, metavar="SEP", help="The separator of caption tags (default ',').")
    flag("num_class_images", type=int,
        help="Class images wanted; missing ones are generated with the base model into --class_data_dir.")
    flag("sample_batch_size", type=int, help="Batch size when generating class images.")
    flag("prior_generation_precision", type=str, choices=PRIOR_GENERATION_PRECISION,
        help="Precision of class-image generation (default fp16 on GPU, fp32 on CPU).")
    flag("class_inference_steps", type=int, help="Denoising steps per generated class image.")
    flag("resolution", type=int, help="Training images are resized and cropped to this size.")
    flag("center_crop", action="store_true",
        help="Crop the centre instead of at a random place (needed by --cache_latents).")
    flag("random_flip", action="store_true", help="Flip images horizontally at random each step.")
    flag("enable_bucket", action="store_true",
        help="Aspect-ratio buckets: resize each image into the bucket (about --resolution^2 pixels, sides multiples "
             "of --bucket_reso_steps) nearest its shape instead of cropping a square.")
    flag("min_bucket_reso", type=int, help="Shortest bucket side (with --enable_bucket).")
    flag("max_bucket_reso", type=int, help="Longest bucket side (with --enable_bucket).")
    flag("bucket_reso_steps", type=int, help="Bucket sides are multiples of this (with --enable_bucket).")
    flag("bucket_no_upscale", action="store_true",
        help="Never enlarge an image: small images get a bucket of their own size (with --enable_bucket).")
    flag("cache_latents", action="store_true",
        help="Encode every image with the VAE once before training (and, with a frozen text encoder, every "
             "prompt), then move the VAE off the device.")
    flag("cache_latents_to_disk", action="store_true",
        help="--cache_latents, kept under <output_dir>/latent_cache/ so reruns and resumes reuse it.")
    flag("crops_coords_top_left_h", type=int,
        help="SDXL: crop top coordinate given to the UNet for validation and class images (default 0).")
    flag("crops_coords_top_left_w", type=int,
        help="SDXL: crop left coordinate given to the UNet for validation and class images (default 0).")
    flag("image_interpolation_mode", type=str, choices=INTERPOLATION_MODES,
        help="Resampling filter used to resize images.")
    flag("dataloader_num_workers", type=int, help="Data-loading worker processes (0: main process).")
    # Output
    flag("output_dir", type=str, help="Where weights and checkpoints go.")
    flag("output_name", type=str,
        help="Name of the kohya/A1111 file (<output_name>.safetensors); default: the output folder's name.")
    flag("logging_dir", type=str, help="Tracker folder, relative to --output_dir.")
    flag("report_to", type=str, choices=REPORT_TO, help="Tracker for logs and images.")
    flag("seed", type=int, help="Seed for reproducible training and validation images.")
    # LoRA
    flag("rank", type=int, help="LoRA rank.")
    flag("lora_alpha", type=float, help="LoRA alpha (scale alpha/rank); default: --rank.")
    flag("lora_dropout", type=float, help="Dropout on the LoRA input.")
    flag("train_text_encoder", action="store_true", help="Also train LoRA on the text encoder.")
    # Which layers (docs/dreambooth.md, "Which layers..." and "DoRA")
    flag("lora_layers", type=str, choices=LORA_LAYERS,
        help="attn: the attention projections (UNet to_q/k/v/out, text encoder q/k/v/out_proj); attn-ff: "
             "kohya's default LoRA (the UNet's transformer blocks whole: attention, feed-forward, proj_in/out; "
             "the text encoders' attention and MLP); all-linear: attn-ff plus every other Linear of the UNet "
             "(time embeddings, the ResNets' time_emb_proj).")
    flag("conv_rank", type=int, metavar="N",
        help="LoCon (kohya's conv_dim): also LoRA of rank N on the ResNet, downsampler and upsampler 3x3 "
             "convolutions (their time_emb_proj and 1x1 shortcuts get --rank, as in kohya); needs "
             "--lora_layers attn-ff or all-linear.")
    flag("conv_alpha", type=float, metavar="A",
        help="Alpha of the convolutions' LoRA (scale A/N; kohya's conv_alpha, default 1); needs --conv_rank.")
    flag("use_dora", action="store_true",
        help="DoRA (PEFT's use_dora): each adapted layer also learns a magnitude per output channel, trained "
             "with plain AdamW beside AdaPreLoRA's pairs; written as lora_magnitude_vector (diffusers file) and "
             "dora_scale (kohya/LyCORIS file).")
    # LyCORIS (LoHa, LoKr)
    flag("network_module", type=str, metavar="MODULE",
        help="networks.lora (default: LoRA/LoCon with AdaPreLoRA or any optimizer) or lycoris (also written "
             "lycoris.kohya): a LyCORIS network from the lycoris-lora package, chosen by --network_args algo=.")
    flag("network_args", type=str, nargs="*", metavar="KEY=VALUE",
        help="LyCORIS arguments as kohya writes them, e.g. algo=loha (or lokr) conv_dim=4 conv_alpha=1 factor=8 "
             "preset=attn-mlp dropout=0.1; --rank and --lora_alpha are its linear dim and alpha. LoHa/LoKr have "
             "no LoRA pairs: use --optimizer adamw (or prodigy...), not adaprelora.")
    # Optimisation
    flag("optimizer", type=str, choices=OPTIMIZERS, metavar="NAME",
        help=f"Optimizer: {', '.join(OPTIMIZERS)}.")
    flag("optimizer_args", type=str, nargs="*", metavar="KEY=VALUE",
        help="Extra optimizer arguments, e.g. weight_decay=0.01 betas=(0.9,0.99).")
    flag("learning_rate", type=float, help="Initial learning rate (after warmup).")
    flag("scale_lr", action="store_true",
        help="Multiply the learning rate by accumulation steps x batch size x processes.")
    flag("lr_scheduler", type=str, choices=LR_SCHEDULERS, help="Learning-rate schedule.")
    flag("lr_warmup_steps", type=int, help="Warmup steps of the schedule.")
    flag("lr_num_cycles", type=int, help="Hard restarts of cosine_with_restarts.")
    flag("lr_power", type=float, help="Power of the polynomial schedule.")
    flag("max_grad_norm", type=float, help="Gradient clipping norm (0: off).")
    flag("train_batch_size", type=int, help="Batch size per device.")
    flag("num_train_epochs", type=int, help="Epochs, when --max_train_steps is not given.")
    flag("max_train_steps", type=int, help="Total optimizer steps (overrides --num_train_epochs).")
    flag("gradient_accumulation_steps", type=int, help="Batches accumulated per optimizer step.")
    flag("gradient_checkpointing", action="store_true", help="Save memory at some speed cost.")
    flag("mixed_precision", type=str, choices=MIXED_PRECISION,
        help="Frozen weights in fp16/bf16 (LoRA stays fp32); default: the accelerate config.")
    flag("allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    flag("enable_xformers_memory_efficient_attention", action="store_true",
        help="Use xformers attention (CUDA; needs `pip install xformers`). Default: PyTorch SDPA.")
    flag("snr_gamma", type=float, help="Min-SNR loss weighting gamma (5.0 is recommended).")
    flag("noise_offset", type=float, help="Noise offset (e.g. 0.05) for darker/brighter images.")
    # Checkpoints
    flag("checkpointing_steps", type=int, help="Save a resumable checkpoint every N steps.")
    flag("checkpoints_total_limit", type=int, help="Keep at most this many checkpoints.")
    flag("resume_from_checkpoint", type=str,
        help="'latest', or a checkpoint-<step> folder (name in --output_dir, or a path).")
    # Validation
    flag("validation_prompt", type=str, action="append",
        help="Prompt for sample images; repeat the flag for several prompts.")
    flag("num_validation_images", type=int, help="Sample images per validation prompt.")
    flag("validation_steps", type=int, help="Make sample images every N steps (and at the end).")
    flag("validation_inference_steps", type=int, help="Denoising steps of sample images.")
    flag("validation_width", type=int, help="Width of sample images (default: --resolution).")
    flag("validation_height", type=int, help="Height of sample images (default: --resolution).")
    # Validation loss
    flag("validation_split", type=float, metavar="F",
        help="Hold out this share of the instance images (drawn by --seed; at least one, and at least one left "
             "to train on) and report the denoising loss on them at fixed timesteps and noise: it shows "
             "over-fitting before the samples do.")
    flag("validation_loss_data_dir", type=str, metavar="DIR",
        help="Held-out images for the validation loss instead of --validation_split (an optional <image>.txt "
             "is the caption, else --instance_prompt).")
    flag("validation_loss_steps", type=int, metavar="N",
        help="Evaluate the validation loss every N steps (and before the first and after the last); with "
             "prior preservation also on a few class images (prior_validation_loss). Logged to the tracker and "
             "written to <output_dir>/validation_loss.jsonl.")
    # Export
    flag("skip_export_check", action="store_true",
        help="Do not reload the written LoRA files into a fresh base model to check that they reproduce the "
             "trained model (the check runs by default at the end of every run).")
    # Masked loss (kohya's flags)
    flag("masked_loss", action="store_true",
        help="Weigh the denoising loss per pixel by a mask (white trains, black is ignored, grey in between) "
             "from --conditioning_data_dir or, with --alpha_mask, the images' transparency; class images stay "
             "unmasked (docs/dreambooth.md, \"Masked loss\").")
    flag("conditioning_data_dir", type=str, metavar="DIR",
        help="With --masked_loss: one mask image per instance image, with its file name (any image extension) "
             "and its size; the red channel is read.")
    flag("alpha_mask", action="store_true",
        help="The instance images' alpha channel is the loss mask (transparent pixels are ignored); implies "
             "--masked_loss. Images without transparency train whole.")
    # EMA of the LoRA weights
    flag("use_ema", action="store_true",
        help="Keep an exponential moving average (fp32) of the trained LoRA tensors: validation images, the "
             "validation loss and both exported files come from it (docs/dreambooth.md, \"EMA of the LoRA weights\").")
    flag("ema_decay", type=float, metavar="D",
        help="The EMA's decay once warmed up, between 0 and 1 (with --use_ema).")
    flag("ema_warmup", type=str, choices=EMA_WARMUPS,
        help="ratio: the decay of update t is min(--ema_decay, (1+t)/(10+t)) (OneTrainer's and diffusers' "
             "default); none: --ema_decay from the start (with --use_ema).")
    flag("ema_update_after_step", type=int, metavar="N",
        help="The EMA copies the weights for the first N steps and averages from then on (with --use_ema).")
    flag("ema_cpu", action="store_true",
        help="Keep the EMA in CPU memory instead of the accelerator's (a copy per step; with --use_ema).")
    flag("ema_save_raw", action="store_true",
        help="Also write the last step's weights without EMA: pytorch_lora_weights_raw.safetensors and "
             "<output_name>_raw.safetensors (with --use_ema).")
    return parser


def parse_args(input_args=None) -> TrainConfig:
    args = build_parser().parse_args(input_args)
    args.optimizer_args = parse_optimizer_args(args.optimizer_args)
    return TrainConfig.from_namespace(args)


def main(input_args=None):
    from adaprelora.training.dreambooth import run_cli_training

    return run_cli_training(parse_args(input_args))


if __name__ == "__main__":
    run_cli(main)
