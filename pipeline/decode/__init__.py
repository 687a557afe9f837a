"""Decoding a video into the frames ST-LLM sees: `decoders` holds the work (sampling, decord → PyAV, resize),
`worker` runs it in a killable subprocess with a deadline. `decode_video` is the entry point."""

from pipeline.decode.decoders import DecodedVideo, DecodeError, Decoder, DecodeTimeout
from pipeline.decode.worker import DecodeWorker, decode_video, decode_video_inline

__all__ = ["DecodedVideo", "DecodeError", "DecodeTimeout", "DecodeWorker", "Decoder", "decode_video",
           "decode_video_inline"]
