"""Load a converted checkpoint folder strictly (missing or unexpected keys are an error that names them), and
the folder's content identity (a hash of its weights, so an index knows when the weights changed)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from stllm.modeling_stllm import STLLMForConditionalGeneration
from stllm.processing_stllm import STLLMProcessor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS_HASH_FILE = "weights_hash.json"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no *.safetensors weights (convert the released weights first)")
    return files


def compute_weights_hash(path: str | os.PathLike) -> str:
    """sha256 over the folder's safetensors files (names and bytes, in name order)."""
    h = hashlib.sha256()
    for f in _weight_files(Path(path)):
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def write_weights_hash(path: str | os.PathLike) -> str:
    """Record the weights' hash in the folder (`weights_hash.json`); every writer of a folder calls this."""
    digest = compute_weights_hash(path)
    (Path(path) / WEIGHTS_HASH_FILE).write_text(json.dumps({"sha256": digest}) + "\n")
    return digest


def save_model_folder(model: STLLMForConditionalGeneration, processor: STLLMProcessor,
                      dst: str | os.PathLike, max_shard_size: str | int = "5GB") -> Path:
    """A model folder in the project's format: safetensors + config, both tokenizers, the weights' hash — what
    both engines load. The one writer of such folders (tiny, world, training, convert)."""
    dst = Path(dst)
    model.save_pretrained(dst, max_shard_size=max_shard_size)
    processor.save_pretrained(dst)
    write_weights_hash(dst)
    return dst


def weights_hash(path: str | os.PathLike) -> str:
    """The folder's recorded weights hash; computed (not written: the folder may be read-only) when a folder
    predates the record."""
    record = Path(path) / WEIGHTS_HASH_FILE
    if record.is_file():
        return json.loads(record.read_text())["sha256"]
    return compute_weights_hash(path)


def load_model(
    path: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str = "auto"
) -> tuple[STLLMForConditionalGeneration, STLLMProcessor]:
    """dtype None: bfloat16 on GPU (the released shards' dtype), float32 on CPU; "float16" is the original's."""
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
    if dtype == torch.float16:
        overflow = sorted(n for n, p in model.named_parameters() if not torch.isfinite(p).all())
        if overflow:
            raise ValueError(f"{len(overflow)} weight tensor(s) of {path} do not fit float16 (inf/nan after the "
                             f"cast): {', '.join(overflow[:10])}; use bfloat16")
    model.to(dev).eval()
    return model, STLLMProcessor.from_pretrained(path, config=model.config)
