"""ST-LLM for video indexing: the model, its processor, checkpoint conversion and two engines (hf, vllm).

    from stllm import GenerationOptions, VideoRequest, load_engine

`load_engine` is the one place that builds an engine by name; the interface both engines share is in
`stllm.engine`. The package root stays light (numpy only): decode workers importing `stllm.transforms` do not
pay for torch/transformers, and each engine is imported only when asked for.
"""

from stllm.engine import Engine, EngineKind, GenerationOptions, VideoRequest, VideoResult, decoding_preset

__version__ = "0.1.0"


def load_engine(kind: EngineKind, model_dir: str, **kwargs) -> Engine:
    """Build the `hf` (reference, any machine) or `vllm` (production) engine over a converted checkpoint folder
    (see `stllm-index convert`)."""
    if kind == "hf":
        from stllm.hf_engine import HFEngine

        return HFEngine.from_pretrained(model_dir, **kwargs)
    if kind == "vllm":
        from stllm.vllm.engine import VLLMEngine

        return VLLMEngine.from_pretrained(model_dir, **kwargs)
    raise ValueError(f"engine must be 'hf' or 'vllm', got {kind!r}")


__all__ = ["Engine", "EngineKind", "GenerationOptions", "VideoRequest", "VideoResult", "decoding_preset",
           "load_engine"]
