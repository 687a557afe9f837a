"""ST-LLM for video indexing: the model, its processor, checkpoint conversion and two engines (hf, vllm).

Import the pieces from their modules (`stllm.modeling_stllm`, `stllm.engine`, ...); this package root stays
light so that decode workers importing `stllm.transforms` do not pay for torch/transformers.
"""

__version__ = "0.1.0"
