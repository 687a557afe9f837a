"""Decoding a video into the frames ST-LLM sees: `decoders` holds the work (probe, sampling, decord → PyAV),
`decord_runs` how decord is read (runs side by side), `frames` the resize/crop collector and the errors,
`worker` runs it in a killable subprocess with a deadline, `segments` splits long recordings.
`decode_video` is the entry point."""

from pipeline.decode.decoders import DecodedVideo, Decoder
from pipeline.decode.frames import DecodeError, DecodeTimeout
from pipeline.decode.worker import DecodeWorker, decode_video, decode_video_inline

__all__ = ["DecodedVideo", "DecodeError", "DecodeTimeout", "DecodeWorker", "Decoder", "decode_video",
           "decode_video_inline"]
