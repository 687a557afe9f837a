"""Load a converted checkpoint folder strictly: missing or unexpected keys are an error that names them."""

from __future__ import annotations

import os

import torch

from stllm.modeling_stllm import STLLMForConditionalGeneration
from stllm.processing_stllm import STLLMProcessor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    path: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str = "auto"
) -> tuple[STLLMForConditionalGeneration, STLLMProcessor]:
    if not os.path.isdir(path):
        raise ValueError(f"model folder {path} does not exist (convert the released weights first)")
    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    model, info = STLLMForConditionalGeneration.from_pretrained(path, dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        desc = "; ".join(f"{k.replace('_', ' ')} ({len(v)}): {', '.join(map(str, sorted(v)[:50]))}"
                         for k, v in problems.items())
        raise ValueError(f"checkpoint {path} does not match the model: {desc}")
    model.to(dev).eval()
    return model, STLLMProcessor.from_pretrained(path, config=model.config)
