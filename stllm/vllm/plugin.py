"""The `vllm.general_plugins` entry point (pyproject: `stllm = "stllm.vllm.plugin:register"`).

vLLM calls `register()` in every process it starts (driver, EngineCore, workers, Ray actors), so the
registration below is not lost across process boundaries. Idempotent: vLLM may call it several times.
"""

from __future__ import annotations

from stllm.vllm import ARCHITECTURE, MODEL_CLASS


def register() -> None:
    # model_type "stllm" is not a transformers type: without this, vLLM's config parser falls through to
    # AutoConfig, which refuses the folder. Registering it also makes vLLM see the LLaMA as
    # `get_text_config()` (max_model_len, vocab, heads).
    from transformers import AutoConfig

    from stllm.configuration_stllm import STLLMConfig

    AutoConfig.register(STLLMConfig.model_type, STLLMConfig, exist_ok=True)

    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # The "module:Class" string form imports the model lazily, in whichever process needs it.
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
