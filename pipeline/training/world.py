"""`stllm-index synth` and `stllm-index eval`: the synthetic world as real files, and a model graded on them.

`synth` renders scenes (`stllm.world`), encodes each as a real video (H.264, VP9 and HEVC in turn) and writes
the truth: `manifest.parquet` / `manifest.jsonl` — a row per clip and instruction, in the format `export`
writes and `train` reads (uri, question, answer, split, …) plus `qtype` and the scene's attributes — and
`scenes.jsonl` (every scene's full truth). `evaluate` decodes each clip through the pipeline's own decoder,
asks the model its questions and grades the answers (`stllm.world.scoring`), per split and question type.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.catalog.export import MANIFEST_SCHEMA
from pipeline.demo.clips import Codec, encode_frames
from pipeline.io.sources import object_id
from stllm.world.render import render
from stllm.world.scenes import CAPTION_PROMPT, QUESTIONS, SPLITS, Split, sample_scene
from stllm.world.scoring import Report

CODECS: tuple[Codec, ...] = ("h264", "vp9", "hevc")
_SUFFIX = {"h264": ".mp4", "hevc": ".mp4", "vp9": ".webm", "av1": ".mkv"}
ATTRIBUTES = ("shape", "colour", "size", "direction", "speed")
WORLD_MANIFEST_SCHEMA = MANIFEST_SCHEMA.append(pa.field("qtype", pa.string(), nullable=False))
for _name in ATTRIBUTES:
    WORLD_MANIFEST_SCHEMA = WORLD_MANIFEST_SCHEMA.append(pa.field(_name, pa.string()))


def synth(out: str | os.PathLike, n: int, seed: int = 0, splits: Sequence[Split] = SPLITS,
          codecs: Sequence[Codec] = CODECS, n_frames: int = 16, fps: int = 8, size: int = 64,
          reversed_pairs: bool = False) -> dict[str, Any]:
    """Write `n` clips per split under `out` with their truth; returns {split: clips} and the manifest paths.
    `reversed_pairs`: each `train` scene also as its clip played backwards (`Scene.reversed`, the opposite
    direction): the two hold the same frames in opposite order, so only temporal order tells them apart — the
    strongest teacher of the direction question."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {s!r}")
    if size % 2:
        raise ValueError(f"size must be even (yuv420p), got {size}")
    codecs = [c for c in codecs if _encodable(c)]  # a PyAV build without an encoder uses the others
    if not codecs:
        raise ValueError("none of the codecs can be encoded by this PyAV build")
    out = Path(out)
    rows: list[dict[str, Any]] = []
    scenes: list[dict[str, Any]] = []
    for split in splits:
        drawn = [sample_scene(seed, split, i, n_frames=n_frames, fps=fps, size=(size, size)) for i in range(n)]
        if reversed_pairs and split == "train":
            drawn = [s for scene in drawn for s in (scene, scene.reversed())]
        for i, scene in enumerate(drawn):
            codec = codecs[i % len(codecs)]
            path = (out / "clips" / split / scene.clip_id).with_suffix(_SUFFIX[codec])
            encode_frames(path, codec, render(scene), (size, size), fps)
            uri = str(path.resolve())
            truth = scene.answers()
            attrs = {a: getattr(scene, a) for a in ATTRIBUTES}
            common = {"uri": uri, "video_id": object_id(uri), "content_id": None, "split": split,
                      "group_id": scene.clip_id, "duration_s": n_frames / fps, "codec": codec, "width": size,
                      "height": size, "start_s": None, "end_s": None, "model": None, **attrs}
            rows.append({**common, "question": CAPTION_PROMPT, "answer": scene.caption(), "qtype": "caption"})
            for qtype, question in QUESTIONS.items():
                rows.append({**common, "question": question, "answer": truth[qtype], "qtype": qtype})
            scenes.append({**scene.truth(), "uri": uri, "codec": codec, "caption": scene.caption()})
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=WORLD_MANIFEST_SCHEMA)
    pq.write_table(table, out / "manifest.parquet")
    with open(out / "manifest.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(out / "scenes.jsonl", "w") as f:
        for s in scenes:
            f.write(json.dumps(s) + "\n")
    counts: dict[str, int] = defaultdict(int)
    for s in scenes:
        counts[s["split"]] += 1
    return {"clips": dict(counts), "rows": len(rows), "manifest": str(out / "manifest.parquet")}


def _encodable(codec: Codec) -> bool:
    from pipeline.demo.clips import available_encoder

    try:
        available_encoder(codec)
        return True
    except RuntimeError:
        return False


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A training/eval manifest (Parquet or JSONL) as rows."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.parquet"
    if path.suffix == ".jsonl":
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    return pq.read_table(path).to_pylist()


def evaluate(model_dir: str, manifest: str | os.PathLike, *, engine: str = "hf", limit: int | None = None,
             options: Any = None, dtype: str | None = None, device: str = "auto",
             answers_out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Grade a model on a manifest's clips: accuracy per split and question type (rows without `qtype` are
    graded as 'caption' when their question is the caption prompt, else as 'answer')."""
    from pipeline.decode import decode_video
    from pipeline.io.fetch import fetched
    from stllm import load_engine
    from stllm.configuration_stllm import STLLMConfig
    from stllm.engine import GenerationOptions, VideoRequest
    from stllm.prompts import prompt_format

    rows = read_manifest(manifest)
    by_clip: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_clip[r["uri"]].append(r)
    per_split: dict[str, list[str]] = defaultdict(list)
    for uri in sorted(by_clip):
        per_split[by_clip[uri][0].get("split") or "all"].append(uri)
    clips = [u for split in sorted(per_split) for u in per_split[split][:limit]]  # `limit` clips per split
    config = STLLMConfig.from_pretrained(model_dir)
    options = options or GenerationOptions(max_new_tokens=24, prompt=prompt_format("qa"))
    requests, skipped = [], []
    for uri in clips:
        try:
            with fetched(uri, None) as path:
                video = decode_video(path, num_frames=config.num_frames, size=config.image_size,
                                     sampling=config.frame_sampling)
        except Exception as e:  # noqa: BLE001 — a clip that cannot be read is listed, the others graded
            skipped.append({"uri": uri, "error": f"{type(e).__name__}: {e}"})
            continue
        requests.append(VideoRequest(uri, video.frames, [r["question"] for r in by_clip[uri]], sampled=True))
    model = load_engine(engine, model_dir, dtype=dtype, device=device)
    try:
        results = model.generate(requests, options)
    finally:
        model.close()
    reports: dict[str, Report] = defaultdict(Report)
    graded = []
    for req, res in zip(requests, results, strict=True):
        texts = [a.text for a in res.answers] if res.ok else []
        for qi, r in enumerate(by_clip[req.video_id]):
            qtype = r.get("qtype") or ("caption" if r["question"] == CAPTION_PROMPT else "answer")
            answer = texts[qi] if qi < len(texts) else ""  # a failed request's questions count as wrong
            ok = reports[r.get("split") or "all"].add(qtype, answer, r["answer"])
            graded.append({"uri": req.video_id, "split": r.get("split"), "qtype": qtype, "question": r["question"],
                           "truth": r["answer"], "answer": answer, "right": ok, "error": res.error})
    if answers_out:
        with open(answers_out, "w") as f:
            for g in graded:
                f.write(json.dumps(g) + "\n")
    return {"model": str(model_dir), "engine": engine, "clips": len(requests), "skipped": skipped,
            "splits": {s: rep.as_dict() for s, rep in sorted(reports.items())}}


__all__ = ["ATTRIBUTES", "CODECS", "WORLD_MANIFEST_SCHEMA", "evaluate", "read_manifest", "synth"]
