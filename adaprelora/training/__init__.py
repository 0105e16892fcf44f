"""Training code shared by `train_dreambooth.py`, `finetune_llm.py` and the Gradio app.

A small framework with two users. Shared: `errors` (UserError, the CLI runner), `options`
(optimizer names and arguments, learning-rate schedules), `checkpoints` (checkpoint-<step> folders:
rotate, save atomically, resume, LoRA-only hooks) and `loop` (the training loop and its
`TrainEvent`). Each trainer keeps only what is its own: `dreambooth/` (Stable Diffusion DreamBooth
LoRA) and `llm/` (GLUE and GSM8K fine-tuning). Imports go one way: trainers -> shared modules.
"""
