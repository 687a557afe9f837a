"""What flows between the stages: the kinds of row the listing emits and the stages pass on.

- `work`: an object whose cells are missing: decode it, run the model on what it needs, write its cells and
  its view row;
- `copy`: an object whose cells all exist already (an exact copy of another object, a view to rebuild after a
  job changed): nothing runs, the writer builds its view row from the cells;
- `segment`: a moment of a long recording, emitted by the decode stage before its video's `work` row.

What a listing page counts (listed, skipped, known-bad, deferred) travels outside the rows
(`pipeline.run_stats`).

Each stage is a callable over Arrow batches whose input and output are declared here: `listing_schema` (the
listing's rows, the decode stage's input), `decoded_schema` (its output, the model stage's input: the frames as
one binary value per row, uint8 (T, H, W, 3) of shape `frames_shape`, read in place), `modeled_schema` (the
model stage's output, what the writer takes).
"""

from __future__ import annotations

import pyarrow as pa

from schemas import ANSWER_TYPE, SCORE_FIELDS

WORK, COPY, SEGMENT = "work", "copy", "segment"
TALLY_FIELDS = ("listed", "skipped", "known_bad", "deferred")


def listing_schema() -> pa.Schema:
    """The rows the listing emits (the decode stage's input)."""
    ts = pa.timestamp("us", tz="UTC")
    return pa.schema([
        pa.field("kind", pa.string()), pa.field("uri", pa.string()), pa.field("video_id", pa.string()),
        pa.field("content_id", pa.string()), pa.field("size", pa.int64()), pa.field("etag", pa.string()),
        pa.field("mtime", pa.float64()), pa.field("copy_of", pa.string()), pa.field("prev_attempts", pa.int64()),
        pa.field("first_seen", ts), pa.field("indexed_at", ts),
        pa.field("in_ledger", pa.bool_()),  # the error ledger holds a record of it under this job
        # a copy waiting for the cells of a content this run is computing
        pa.field("wait", pa.bool_()),
        # what the model must generate (null / empty: nothing), and for the video's segments
        pa.field("caption_prompt", pa.string()), pa.field("questions", pa.list_(pa.string())),
        pa.field("need_media", pa.bool_()), pa.field("need_visual", pa.bool_()), pa.field("need_scores", pa.bool_()),
        pa.field("need_segments", pa.bool_()), pa.field("segment_caption_prompt", pa.string()),
        pa.field("segment_questions", pa.list_(pa.string())),
        pa.field("reused", pa.int64()),  # cells of this job that were there already
    ])


ERROR_FIELDS = [pa.field("error_stage", pa.string()), pa.field("error_type", pa.string()),
                pa.field("error_message", pa.string()), pa.field("error_retryable", pa.bool_())]


def decoded_schema() -> pa.Schema:
    """The decode stage's rows: the listing's, with the sampled frames, what decoding found, the curation signals,
    a failure (`error_*`) and, for a long recording's moments, where they are."""
    return pa.schema([
        *listing_schema(),
        pa.field("frames", pa.binary()), pa.field("frames_shape", pa.list_(pa.int32())),
        pa.field("frame_indices", pa.list_(pa.int32())), pa.field("duration_s", pa.float64()),
        pa.field("fps", pa.float64()), pa.field("width", pa.int32()), pa.field("height", pa.int32()),
        pa.field("codec", pa.string()), pa.field("decoder", pa.string()), pa.field("n_frames", pa.int64()),
        pa.field("thumbnail", pa.binary()), pa.field("decode_s", pa.float64()),
        *SCORE_FIELDS, pa.field("scores_s", pa.float64()), *ERROR_FIELDS,
        pa.field("segment_id", pa.string()), pa.field("segment", pa.int32()), pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()), pa.field("segment_rows", pa.int64()),
    ])


QA_TYPE = pa.list_(pa.struct([ANSWER_TYPE.field("question"), ANSWER_TYPE.field("answer")]))


def modeled_schema() -> pa.Schema:
    """The model stage's rows: the decode stage's without the frames, with what the model generated (only what
    the row asked for), the visual embedding, the caption's text embedding, and the time each took."""
    decoded = decoded_schema()
    kept = [f for f in decoded if f.name not in ("frames", "frames_shape")]
    return pa.schema([
        *kept, pa.field("caption", pa.string()), pa.field("answers", QA_TYPE),
        pa.field("visual_embedding", pa.list_(pa.float32())),
        pa.field("caption_embedding", pa.list_(pa.float32())), pa.field("model_calls", pa.int64()),
        pa.field("model_s", pa.float64()), pa.field("embed_s", pa.float64()),
    ])


__all__ = ["WORK", "COPY", "SEGMENT", "TALLY_FIELDS", "ERROR_FIELDS", "QA_TYPE", "decoded_schema", "listing_schema",
           "modeled_schema"]
