"""ST-LLM served by vLLM: plugin (registration), multimodal processor + model, output-only repetition
penalty, and the `vllm` engine behind the shared `stllm.engine` interface.

Importing this package stays cheap (no vLLM import): vLLM imports `stllm.vllm.plugin` in every process.
"""

ARCHITECTURE = "STLLMForConditionalGeneration"
MODEL_CLASS = "stllm.vllm.model:STLLMVLLMModel"

__all__ = ["ARCHITECTURE", "MODEL_CLASS"]
