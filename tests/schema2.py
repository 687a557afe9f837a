"""An index in the previous layout (schema version 2: one `videos` row per (object, job config), no cells), written
directly with pyarrow and LanceDB, for the migration test. The schema is the one the previous release wrote."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.sources import local_content_id, local_fingerprint, object_id
from pipeline.store.lance import connect_lance

META = {b"stllm_index.schema_version": b"2", b"stllm_index.table": b"videos"}
TS = pa.timestamp("us", tz="UTC")


def video_schema_v2(text_dim: int, visual_dim: int) -> pa.Schema:
    answer = pa.struct([pa.field("question", pa.string()), pa.field("answer", pa.string())])
    timings = pa.struct([pa.field(k, pa.float64()) for k in ("fetch_s", "decode_s", "model_s", "embed_s")])
    return pa.schema([
        pa.field("video_id", pa.string(), nullable=False), pa.field("content_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False), pa.field("size", pa.int64(), nullable=False),
        pa.field("etag", pa.string(), nullable=False), pa.field("copy_of", pa.string()),
        pa.field("run_id", pa.string(), nullable=False), pa.field("model_id", pa.string(), nullable=False),
        pa.field("config_hash", pa.string(), nullable=False), pa.field("questions_hash", pa.string(), nullable=False),
        pa.field("caption", pa.string()), pa.field("answers", pa.list_(answer)), pa.field("answers_text", pa.string()),
        pa.field("caption_embedding", pa.list_(pa.float32(), text_dim)),
        pa.field("visual_embedding", pa.list_(pa.float32(), visual_dim)),
        pa.field("duration_s", pa.float64()), pa.field("fps", pa.float64()), pa.field("width", pa.int32()),
        pa.field("height", pa.int32()), pa.field("codec", pa.string()), pa.field("decoder", pa.string()),
        pa.field("n_frames", pa.int64()), pa.field("frame_indices", pa.list_(pa.int32())),
        pa.field("thumbnail", pa.binary()), pa.field("timings", timings),
        pa.field("indexed_at", TS, nullable=False), pa.field("part", pa.string()),
    ], metadata=META)


def write_schema2_index(out: Path, uris: list[str], *, config_hashes: list[str], question: str,
                        text_dim: int = 384, visual_dim: int = 176) -> None:
    """`<out>/parquet/videos/` and `<out>/lancedb` table `videos`: a row per uri and config (the first config's
    captions "v2 caption of <name>", the others' "older caption of <name>", each a day older)."""
    rng = np.random.default_rng(0)
    now = datetime.now(UTC)
    rows = []
    for k, cfg in enumerate(config_hashes):
        for uri in uris:
            name = Path(uri).name
            vec = rng.standard_normal(visual_dim).astype(np.float32)
            text = rng.standard_normal(text_dim).astype(np.float32)
            rows.append({
                "video_id": object_id(uri), "content_id": local_content_id(uri), "uri": uri,
                "size": Path(uri).stat().st_size, "etag": local_fingerprint(Path(uri)), "copy_of": None,
                "run_id": f"v2-run-{k}", "model_id": "tiny-model-v3:residual:8", "config_hash": cfg,
                "questions_hash": "q", "caption": f"{'v2' if k == 0 else 'older'} caption of {name}",
                "answers": [{"question": question, "answer": f"v2 answer {name}"}],
                "answers_text": f"{question} v2 answer {name}",
                "caption_embedding": (text / np.linalg.norm(text)).tolist(),
                "visual_embedding": (vec / np.linalg.norm(vec)).tolist(), "duration_s": 1.0, "fps": 12.0,
                "width": 64, "height": 48, "codec": "h264", "decoder": "decord", "n_frames": 12,
                "frame_indices": list(range(8)), "thumbnail": b"\xff\xd8", "timings": {"decode_s": 0.1},
                "indexed_at": now - timedelta(days=k), "part": "part-v2.parquet",
            })
    table = pa.Table.from_pylist(rows, schema=video_schema_v2(text_dim, visual_dim))
    folder = out / "parquet" / "videos"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-v2.parquet")
    connect_lance(str(out / "lancedb")).create_table("videos", table)
