"""The two engines by name: `load_engine("hf" | "vllm", folder)` (each imported only when asked for)."""

from __future__ import annotations

from stllm.engine import Engine, EngineKind


def load_engine(kind: EngineKind, model_dir: str, **kwargs) -> Engine:
    """Build an engine over a converted checkpoint folder (see `stllm-index convert`)."""
    if kind == "hf":
        from stllm.hf_engine import HFEngine

        return HFEngine.from_pretrained(model_dir, **kwargs)
    if kind == "vllm":
        from stllm.vllm.engine import VLLMEngine

        return VLLMEngine.from_pretrained(model_dir, **kwargs)
    raise ValueError(f"engine must be 'hf' or 'vllm', got {kind!r}")
