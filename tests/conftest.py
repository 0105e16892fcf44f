"""Test-wide settings: offline Hub, no analytics, Triton kernels run in the CPU interpreter."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Must be set before triton is first imported: lets @triton.jit kernels run on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")
