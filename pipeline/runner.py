"""Run one indexing job: list → skip already indexed → Ray Data stages → one writer → summary.

The driver lists the source and is the single writer of the Parquet dataset and the LanceDB table
(LanceDB writers conflict); a pool of decode actors feeds a pool of model actors, which also embed the text.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from pipeline.paths import checkpoint_id, resolve_model_path
from pipeline.stages.decode import DecodeStage
from pipeline.stages.model import ModelStage

log = logging.getLogger(__name__)
BLOCKS_PER_BUDGET = 8  # blocks of rows in flight that fit `runtime.buffer_mb` at least
BLOCK_MIN_BYTES = 1 << 20  # smaller blocks cost Ray more per row than they save


def model_facts(job) -> dict[str, Any]:
    """num_frames / frame sampling / image size / content identity of the checkpoint the job uses."""
    path = Path(resolve_model_path(job.model.path))
    if not (path / "config.json").is_file():
        raise ValueError(f"model.path: {path} is not a converted checkpoint folder (no config.json); "
                         "convert the released weights with `stllm-index convert`")
    cfg = json.loads((path / "config.json").read_text())
    return {
        "path": str(path),
        "num_frames": job.model.num_frames or cfg["num_frames"],
        "frame_sampling": job.model.frame_sampling or cfg.get("frame_sampling", "original"),
        "image_size": cfg.get("image_size", 224),
        "model_id": f"{path.name}:{cfg.get('video_input')}:{cfg['num_frames']}",
        "checkpoint_id": checkpoint_id(path),
    }


def init_ray(address: str | None, job) -> None:
    import ray

    if ray.is_initialized():
        return
    # No usage reporting (offline machines); it also stops Ray Data polling a Prometheus port at exit.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or job.runtime.address or os.environ.get("RAY_ADDRESS")
    # The project must be importable in every worker; a job file is small config, not code.
    # Two malloc arenas: glibc's default (8 per core) lets long-lived actors' RSS creep up with batch count.
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", "MALLOC_ARENA_MAX": "2"}}
    verbose = log.isEnabledFor(logging.INFO)  # `stllm-index -v`; the CLI sends the rest to its log file
    with warnings.catch_warnings():
        # Ray starts its processes with fork + exec; lancedb's fork warning (when a table was opened earlier in
        # this process) is about forks that go on running Python, not this.
        warnings.filterwarnings("ignore", message="lancedb fork support", category=RuntimeWarning)
        level = logging.INFO if verbose else logging.ERROR
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=False, logging_level=level)
        else:
            ray.init(runtime_env=env, include_dashboard=False, log_to_driver=False,
                     num_cpus=job.runtime.num_cpus, logging_level=level)
    fit_cpu_reservations(job, ray.cluster_resources().get("CPU", 1.0))
    ctx = ray.data.DataContext.get_current()
    limits = ctx.execution_options.resource_limits
    budget = job.runtime.buffer_mb * 2**20
    ctx.execution_options.resource_limits = limits.copy(object_store_memory=budget)
    # Blocks, the unit Ray Data builds, stores and moves, must be small next to the budget, or the budget cannot
    # hold: at Ray's default (128 MiB) one decode block held ~110 videos' frames, built in the decode actor's heap
    # and then stored whole — a 64 MiB budget held 2 such blocks, and the actors' memory grew to that.
    ctx.target_max_block_size = min(ctx.target_max_block_size, max(BLOCK_MIN_BYTES, budget // BLOCKS_PER_BUDGET))
    ctx.enable_progress_bars = False  # our own progress bar below
    ctx.print_on_execution_start = False


def fit_cpu_reservations(job, cluster_cpus: float) -> None:
    """Fixed-size actor pools must fit the cluster, or Ray never schedules some of them (a silent hang on a
    small machine). Fewer decode actors first (one at least), then smaller model actor reservations."""
    rt = job.runtime
    model = rt.model_pool_size * rt.model_cpus
    fits = int((cluster_cpus - model) / rt.decode_cpus + 1e-9)
    if fits < rt.decode_concurrency:
        log.warning("%d decode actors x %.2f CPUs + model actors do not fit %.1f CPUs: %d decode actor(s)",
                    rt.decode_concurrency, rt.decode_cpus, cluster_cpus, max(fits, 1))
        rt.decode_concurrency = max(fits, 1)
    room = cluster_cpus - rt.decode_concurrency * rt.decode_cpus
    if model > room:
        rt.model_cpus = round(rt.model_cpus * max(room, 0.1) / model, 3) or 0.01
        log.warning("scaled model actor CPU reservations to fit %.1f CPUs: %.2f each", cluster_cpus, rt.model_cpus)


def stage_ops(job, facts: dict[str, Any], hub: Any = None) -> dict[str, Callable[[Any], Any]]:
    """The stages as Ray Data operators, in order, over Arrow batches (schemas/stages.py). Actor pools with
    bounded sizes: a set number of processes for the whole run (decode actors keep their killable decoder
    subprocess warm), so memory does not grow with the archive. `hub`: the run's RunStats actor the stages report
    to."""
    from ray.data import ActorPoolStrategy

    rt = job.runtime

    def restarts() -> dict[str, int]:  # an actor that died is restarted and its batch retried, this often
        return {"max_restarts": rt.actor_restarts, "max_task_retries": rt.actor_restarts}

    def decode(ds):
        return ds.map_batches(
            DecodeStage, batch_format="pyarrow", batch_size=rt.decode_batch_size,
            compute=ActorPoolStrategy(size=rt.decode_concurrency),
            num_cpus=rt.decode_cpus,
            fn_constructor_kwargs=dict(num_frames=facts["num_frames"], image_size=facts["image_size"],
                                       timeout_s=rt.decode_timeout_s, s3_options=job.source.s3,
                                       nice=rt.decode_nice, frame_sampling=facts["frame_sampling"],
                                       max_bytes=job.source.max_bytes, fetch_timeout_s=job.source.fetch_timeout_s,
                                       segments=job.segments.model_dump(), scores=job.scores.model_dump(),
                                       hub=hub),
            ray_remote_args_fn=restarts,
        )

    def model(ds):
        return ds.map_batches(
            ModelStage, batch_format="pyarrow",
            batch_size=rt.batch_size,
            # Ray runs an actor's calls one at a time unless told otherwise, and a call holds one bundle (often
            # one batch): the calls themselves must overlap (actor concurrency, as Ray Data LLM sets it), with
            # as many more queued behind them so the next batch is already there when one finishes.
            compute=ActorPoolStrategy(size=rt.model_pool_size,
                                      max_concurrent_calls_per_actor=rt.model_batches_in_flight,
                                      max_tasks_in_flight_per_actor=2 * rt.model_batches_in_flight),
            num_gpus=rt.num_gpus_per_actor,
            num_cpus=rt.model_cpus,
            fn_constructor_kwargs=dict(
                engine=job.model.engine, model_path=facts["path"], dtype=job.model.dtype, device=job.model.device,
                options=job.generation_options(), engine_kwargs=job.model.engine_kwargs,
                embedder=dict(model=job.embedder.model, batch_size=job.embedder.batch_size),
                batches_in_flight=rt.model_batches_in_flight, hub=hub,
            ),
            # A model actor that died (or exited because its engine broke) is restarted, its batch retried.
            ray_remote_args_fn=restarts,
        )

    return {"decode": decode, "model": model}


def work_plan(job, spec, retry_errors: bool = False, where: str | None = None):
    from pipeline.io.listing import WorkPlan

    src, rt = job.source, job.runtime
    return WorkPlan(
        source_uri=src.uri, extensions=tuple(src.extensions), source_s3=src.s3, spec=spec, index=index_location(job),
        skip_existing=rt.skip_existing, retry_errors=retry_errors or rt.retry_errors,
        retry_after_s=rt.retry_errors_after_h * 3600 if rt.retry_errors_after_h else None,
        limit=src.limit, page_size=src.page_size, where=where)


def index_location(job):
    from pipeline.store.location import IndexLocation

    out = job.output
    return IndexLocation(parquet_root=out.parquet, lancedb=out.lancedb, videos_table=out.table,
                         errors_table=out.errors_table, s3=out.s3, segments_table=out.segments_table)


def output_locations(job) -> dict[str, Any]:
    """Where a run writes, for its manifest."""
    from pipeline.store.files import join_path

    out = job.output
    loc: dict[str, Any] = {"table": out.table, "errors_table": out.errors_table}
    if out.parquet:
        loc["parquet"] = join_path(out.parquet, out.table)
        loc["errors_parquet"] = join_path(out.parquet, out.errors_table)
    if out.lancedb:
        loc["lancedb"] = out.lancedb
    loc["manifest_dir"] = manifest_dir(job)
    return loc


def manifest_dir(job) -> str:
    from pipeline.store.files import join_path

    out = job.output
    return out.manifest_dir or join_path(out.parquet or out.lancedb or ".", "_manifests")


def run_job(job, address: str | None = None, progress: bool = True, retry_errors: bool = False,
            where: str | None = None, summary: bool | None = None) -> dict[str, Any]:
    """Compute what the job's source is missing; returns the run manifest (also written as the run goes)."""
    from pipeline.io.listing import has_new_work, new_work_dataset
    from pipeline.preflight import check_source
    from pipeline.redact import register_secret
    from pipeline.report import print_summary, progress_bar
    from pipeline.run_stats import RunStats
    from pipeline.store.background import BackgroundWriter
    from pipeline.store.index_record import record_manifest_dir
    from pipeline.store.manifest import RunRecord
    from pipeline.store.writer import IndexWriter

    for s3 in (job.source.s3, job.output.s3):
        if s3 is not None:
            register_secret(s3.access_key_id, s3.secret)
    check_source(job.source)  # a missing or empty source fails here: nothing written, nothing started
    t_start = time.perf_counter()
    started_at = datetime.now(UTC)
    run_id = f"{started_at:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    facts = model_facts(job)
    spec = job.spec(facts)
    if where:  # a bad filter fails before any work, naming the column
        from pipeline.catalog.query import check_columns
        from schemas import video_schema

        check_columns(where, video_schema().names)
    record = RunRecord(manifest_dir(job), run_id, job.output.s3)
    record_manifest_dir(job.output, record.folder)  # so `status INDEX` finds this run's manifest
    record.start({"run_id": run_id, "job": job.name, "config_hash": spec.spec, "model_id": facts["model_id"],
                  "engine": job.model.engine, "started_at": started_at.isoformat(), "job_config": job.redacted(),
                  "outputs": {**output_locations(job), "manifest": record.path}})
    stage_s = {"decode_s": 0.0, "model_s": 0.0, "embed_s": 0.0}
    writer = None
    writer_stats: dict[str, Any] = {}
    stats: dict[str, Any] = {}  # what the workers reported (pipeline.run_stats)
    series: list[list[float]] = []  # [seconds since start, objects done, errors], about every second
    try:
        writer = IndexWriter(index_location(job), spec, run_id=run_id,
                             legacy_hash=job.config_hash(facts["checkpoint_id"]))
        plan = work_plan(job, spec, retry_errors, where)
        if has_new_work(plan):  # Ray only when there is work: a rerun that skips everything starts nothing
            import ray

            init_ray(address, job)
            hub = ray.remote(RunStats).options(num_cpus=0).remote()
            ds = new_work_dataset(plan, hub)
            for op in stage_ops(job, facts, hub).values():
                ds = op(ds)
            background = BackgroundWriter(writer, max_rows=job.runtime.commit_every,
                                          max_seconds=job.runtime.commit_seconds)
            metrics = _serve_metrics(job, run_id, writer, background,
                                     stats=lambda: ray.get(hub.snapshot.remote(), timeout=2))
            polled = 0.0

            def poll(force: bool = False) -> None:
                nonlocal polled, stats
                if force or time.monotonic() - polled >= 1.0:
                    stats = ray.get(hub.snapshot.remote())
                    for f, n in stats["tally"].items():
                        writer.counts[f] = n
                    c = writer.counts
                    series.append([round(time.perf_counter() - t_start, 2), c["indexed"] + c["copies"],
                                     c["errors"]])
                    polled = time.monotonic()

            with progress_bar(None, enabled=progress) as bar:
                try:
                    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=1):
                        for col in stage_s:
                            if col in batch.column_names:
                                stage_s[col] += float(pc.sum(batch.column(col)).as_py() or 0.0)
                        background.submit(batch)
                        poll()
                        c = writer.counts
                        bar.update(done=c["indexed"] + c["copies"] + c["errors"],
                                   total=c["listed"] - c["skipped"] - c["known_bad"] - c["deferred"],
                                   errors=c["errors"])
                        record.beat(lambda: {"counts": writer.counts_json(), "writer": background.stats(),
                                             "progress": _thinned(series)})
                except BaseException:
                    background.close(quiet=True)  # the stages' error is the one to report
                    raise
                else:
                    background.close()
                finally:
                    poll(force=True)
                    if metrics is not None:
                        metrics.close()
            writer_stats = background.stats()
        else:  # nothing new: count what the listing holds without starting anything
            from pipeline.io.listing import iter_work

            for block in iter_work(plan, on_tally=writer.add_tally):
                writer.write(block)
        writer.finish()
    except BaseException as e:
        wall = time.perf_counter() - t_start
        record.end(status="failed", error=f"{type(e).__name__}: {e}", finished_at=datetime.now(UTC).isoformat(),
                   wall_s=round(wall, 3), stage_seconds={k: round(v, 3) for k, v in stage_s.items()},
                   **({"counts": writer.counts_json()} if writer is not None else {}))
        raise
    wall = time.perf_counter() - t_start
    manifest = record.end(
        status="succeeded", finished_at=datetime.now(UTC).isoformat(), wall_s=round(wall, 3),
        counts=writer.counts_json(), writer=writer_stats, stages=stats.get("stages", {}),
        engines=stats.get("engines", []), progress=_thinned(series),
        stage_seconds={k: round(v, 3) for k, v in stage_s.items()},
        videos_per_s=round(writer.counts["indexed"] / wall, 4) if wall else None)
    if progress if summary is None else summary:  # the summary table: with the progress bar unless told
        print_summary(manifest)
    return manifest


def _serve_metrics(job, run_id: str, writer: Any, background: Any, stats: Callable[[], dict[str, Any]]):
    """The run's Prometheus endpoint when the job asks for one (`runtime.metrics_port`)."""
    if job.runtime.metrics_port is None:
        return None
    from pipeline.metrics import RunMetrics

    metrics = RunMetrics(job.runtime.metrics_port, job.name, run_id, counts=writer.counts_json,
                         writer=background.stats, stats=stats)
    log.warning("metrics of run %s: http://localhost:%d/metrics", run_id, metrics.port)
    return metrics


def _thinned(progress: list[list[float]], most: int = 300) -> list[list[float]]:
    """At most `most` points of the progress series (every k-th, the last kept): a day-long run's manifest stays
    small and its plot readable."""
    if len(progress) <= most:
        return list(progress)
    step = -(-len(progress) // most)
    return progress[::step] + ([progress[-1]] if (len(progress) - 1) % step else [])


def exit_status(manifest: dict[str, Any], max_error_fraction: float) -> int:
    """0 for a good run (nothing new is good); 1 when it indexed none of its new objects, or more than
    `max_error_fraction` of them failed."""
    c = manifest["counts"]
    attempted = c.get("indexed", 0) + c.get("copies", 0) + c.get("errors", 0)
    if attempted == 0:
        return 0
    if c.get("indexed", 0) + c.get("copies", 0) == 0 or c.get("errors", 0) / attempted > max_error_fraction:
        return 1
    return 0
