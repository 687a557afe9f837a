"""What flows between the stages: the kinds of row the listing emits and the stages pass on.

- `work`: an object whose cells are missing: decode it, run the model on what it needs, write its cells and
  its view row;
- `copy`: an object whose cells all exist already (an exact copy of another object, a view to rebuild after a
  job changed): nothing runs, the writer builds its view row from the cells;
- `segment`: a moment of a long recording, emitted by the decode stage before its video's `work` row;
- `tally`: what a listing page counted (listed, skipped, known-bad): it rides to the writer untouched.
"""

from __future__ import annotations

import pyarrow as pa

WORK, COPY, SEGMENT, TALLY = "work", "copy", "segment", "tally"
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
        *(pa.field(f, pa.int64()) for f in TALLY_FIELDS),
    ])


__all__ = ["WORK", "COPY", "SEGMENT", "TALLY", "TALLY_FIELDS", "listing_schema"]
