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
    MIXED_PRECISION,
    PRIOR_GENERATION_PRECISION,
    REPORT_TO,
    TrainConfig,
    default_report_to,
)
from adaprelora.training.errors import UserErrorArgumentParser, run_cli
from adaprelora.training.options import LR_SCHEDULERS, parse_optimizer_args

OPTIMIZERS = available_optimizers()


def parse_args(input_args=None):
    parser = UserErrorArgumentParser(description="DreamBooth LoRA training with the AdaPreLoRA optimizer.")
    add = parser.add_argument
    # Model
    add("--pretrained_model_name_or_path", type=str, default=None, required=True,
        help="Hub id or local folder of a Stable Diffusion 1.x/2.x or SDXL pipeline (told apart by model_index.json).")
    add("--revision", type=str, default=None, help="Revision (branch, tag or commit) of the pretrained model.")
    add("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    add("--pretrained_vae_model_name_or_path", type=str, default=None,
        help="A VAE to use instead of the model's own (e.g. an fp16-safe SDXL VAE): Hub id or folder.")
    # Data
    add("--instance_data_dir", type=str, default=None, required=True,
        help="Folder of PNG/JPEG/WebP training images; an optional <image>.txt next to an image is its caption.")
    add("--instance_prompt", type=str, default=None,
        help="Prompt with the identifier of the instance, e.g. 'a photo of sks dog'. Required unless every "
             "image has a caption file.")
    add("--class_data_dir", type=str, default=None, help="Folder of class images (prior preservation).")
    add("--class_prompt", type=str, default=None, help="Prompt of the class images, e.g. 'a photo of a dog'.")
    add("--with_prior_preservation", action="store_true", default=False, help="Add the prior-preservation loss.")
    add("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    add("--class_caption_dropout_rate", type=float, default=0.0,
        help="Share of steps a class image is trained with the empty prompt (with prior preservation): keeps "
             "the unconditional prediction that guidance subtracts where the base model had it; 0.2 on the "
             "built-in model.")
    add("--caption_dropout_rate", type=float, default=0.0,
        help="Share of steps an instance image is trained with the empty prompt (kohya's flag).")
    add("--num_class_images", type=int, default=100,
        help="Class images wanted; missing ones are generated with the base model into --class_data_dir.")
    add("--sample_batch_size", type=int, default=4, help="Batch size when generating class images.")
    add("--prior_generation_precision", type=str, default=None, choices=PRIOR_GENERATION_PRECISION,
        help="Precision of class-image generation (default fp16 on GPU, fp32 on CPU).")
    add("--class_inference_steps", type=int, default=50, help="Denoising steps per generated class image.")
    add("--resolution", type=int, default=512, help="Training images are resized and cropped to this size.")
    add("--center_crop", action="store_true", default=False,
        help="Crop the centre instead of at a random place (needed by --cache_latents).")
    add("--random_flip", action="store_true", default=False, help="Flip images horizontally at random each step.")
    add("--enable_bucket", action="store_true", default=False,
        help="Aspect-ratio buckets: resize each image into the bucket (about --resolution^2 pixels, sides multiples "
             "of --bucket_reso_steps) nearest its shape instead of cropping a square.")
    add("--min_bucket_reso", type=int, default=256, help="Shortest bucket side (with --enable_bucket).")
    add("--max_bucket_reso", type=int, default=1024, help="Longest bucket side (with --enable_bucket).")
    add("--bucket_reso_steps", type=int, default=64, help="Bucket sides are multiples of this (with --enable_bucket).")
    add("--bucket_no_upscale", action="store_true", default=False,
        help="Never enlarge an image: small images get a bucket of their own size (with --enable_bucket).")
    add("--cache_latents", action="store_true", default=False,
        help="Encode every image with the VAE once before training (and, with a frozen text encoder, every "
             "prompt), then move the VAE off the device.")
    add("--cache_latents_to_disk", action="store_true", default=False,
        help="--cache_latents, kept under <output_dir>/latent_cache/ so reruns and resumes reuse it.")
    add("--crops_coords_top_left_h", type=int, default=None,
        help="SDXL: crop top coordinate given to the UNet for validation and class images (default 0).")
    add("--crops_coords_top_left_w", type=int, default=None,
        help="SDXL: crop left coordinate given to the UNet for validation and class images (default 0).")
    add("--image_interpolation_mode", type=str, default="lanczos", choices=INTERPOLATION_MODES,
        help="Resampling filter used to resize images.")
    add("--dataloader_num_workers", type=int, default=0, help="Data-loading worker processes (0: main process).")
    # Output
    add("--output_dir", type=str, default="lora-dreambooth-model", help="Where weights and checkpoints go.")
    add("--output_name", type=str, default=None,
        help="Name of the kohya/A1111 file (<output_name>.safetensors); default: the output folder's name.")
    add("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    add("--report_to", type=str, default=default_report_to(), choices=REPORT_TO, help="Tracker for logs and images.")
    add("--seed", type=int, default=None, help="Seed for reproducible training and validation images.")
    # LoRA
    add("--rank", type=int, default=4, help="LoRA rank.")
    add("--lora_alpha", type=float, default=None, help="LoRA alpha (scale alpha/rank); default: --rank.")
    add("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA input.")
    add("--train_text_encoder", action="store_true", default=False, help="Also train LoRA on the text encoder.")
    # Optimisation
    add("--optimizer", type=str, default="adaprelora", choices=OPTIMIZERS, metavar="NAME",
        help=f"Optimizer: {', '.join(OPTIMIZERS)}.")
    add("--optimizer_args", type=str, nargs="*", default=[], metavar="KEY=VALUE",
        help="Extra optimizer arguments, e.g. weight_decay=0.01 betas=(0.9,0.99).")
    add("--learning_rate", type=float, default=5e-4, help="Initial learning rate (after warmup).")
    add("--scale_lr", action="store_true", default=False,
        help="Multiply the learning rate by accumulation steps x batch size x processes.")
    add("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS, help="Learning-rate schedule.")
    add("--lr_warmup_steps", type=int, default=500, help="Warmup steps of the schedule.")
    add("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    add("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    add("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0: off).")
    add("--train_batch_size", type=int, default=4, help="Batch size per device.")
    add("--num_train_epochs", type=int, default=1, help="Epochs, when --max_train_steps is not given.")
    add("--max_train_steps", type=int, default=None, help="Total optimizer steps (overrides --num_train_epochs).")
    add("--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated per optimizer step.")
    add("--gradient_checkpointing", action="store_true", default=False, help="Save memory at some speed cost.")
    add("--mixed_precision", type=str, default=None, choices=MIXED_PRECISION,
        help="Frozen weights in fp16/bf16 (LoRA stays fp32); default: the accelerate config.")
    add("--allow_tf32", action="store_true", default=False, help="Allow TF32 matmuls on Ampere+ GPUs.")
    add("--enable_xformers_memory_efficient_attention", action="store_true", default=False,
        help="Use xformers attention (CUDA; needs `pip install xformers`). Default: PyTorch SDPA.")
    add("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (5.0 is recommended).")
    add("--noise_offset", type=float, default=0.0, help="Noise offset (e.g. 0.05) for darker/brighter images.")
    # Checkpoints
    add("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    add("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    add("--resume_from_checkpoint", type=str, default=None,
        help="'latest', or a checkpoint-<step> folder (name in --output_dir, or a path).")
    # Validation
    add("--validation_prompt", type=str, action="append", default=None,
        help="Prompt for sample images; repeat the flag for several prompts.")
    add("--num_validation_images", type=int, default=4, help="Sample images per validation prompt.")
    add("--validation_steps", type=int, default=100, help="Make sample images every N steps (and at the end).")
    add("--validation_inference_steps", type=int, default=25, help="Denoising steps of sample images.")
    add("--validation_width", type=int, default=None, help="Width of sample images (default: --resolution).")
    add("--validation_height", type=int, default=None, help="Height of sample images (default: --resolution).")
    # Export
    add("--skip_export_check", action="store_true", default=False,
        help="Do not reload the written LoRA files into a fresh base model to check that they reproduce the "
             "trained model (the check runs by default at the end of every run).")
    args = parser.parse_args(input_args)
    args.optimizer_args = parse_optimizer_args(args.optimizer_args)
    return args


def main(input_args=None):
    from adaprelora.training.dreambooth import run_cli_training

    return run_cli_training(TrainConfig.from_namespace(parse_args(input_args)))


if __name__ == "__main__":
    run_cli(main)
