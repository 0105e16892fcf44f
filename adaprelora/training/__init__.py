"""Training code shared by `train_dreambooth.py`, `finetune_llm.py` and the Gradio app."""
