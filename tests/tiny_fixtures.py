"""Session fixtures: the tiny random ST-LLM in the project's format, built once per test session."""

from __future__ import annotations

import numpy as np
import pytest

from stllm.tiny import build_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny residual-mode (global-local) checkpoint folder: 8 frames, 4 local frames, 32 queries."""
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def hf_engine(tiny_dir):
    from stllm.hf_engine import HFEngine

    return HFEngine.from_pretrained(str(tiny_dir), dtype="float32", device="cpu")


def synthetic_frames(seed: int, t: int = 12, h: int = 48, w: int = 64) -> np.ndarray:
    """Distinct, deterministic uint8 clips: a colour ramp that moves with time plus noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(1, 1, 1, 3))
    ramp = (np.arange(w)[None, None, :, None] * (seed + 1) * 3 + np.arange(t)[:, None, None, None] * 10) % 255
    noise = rng.integers(0, 40, size=(t, h, w, 3))
    return ((base + ramp + noise) % 255).astype(np.uint8)
