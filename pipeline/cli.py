"""`stllm-index`: the project's command line.

  stllm-index convert SRC DST        released ST-LLM weights → the project's safetensors folder
  stllm-index ask VIDEO "question"   answer one question about one video (try a checkpoint)
  stllm-index run JOB.yaml           index what is new in a job's source (local folder or s3:// prefix)
  stllm-index status INDEX           last runs, coverage of each job's cells, errors of an index
  stllm-index prune INDEX            unregister a job, drop superseded cells (history), --dry-run first
  stllm-index search INDEX "text"    hybrid search with filters (--where, --answer, --prefix, --since)
  stllm-index similar INDEX VIDEO    visually similar videos (exact copies left out)
  stllm-index export INDEX --to DIR  a curated subset as a fine-tuning manifest (parquet, jsonl, webdataset)
  stllm-index serve INDEX            a read-only web page to search and browse an index
  stllm-index demo                   the offline demo: the shipped world model on synthetic clips, CPU
  stllm-index synth OUT --n N        synthetic-world clips with their truth (manifest.parquet/.jsonl)
  stllm-index eval MODEL MANIFEST    a model's accuracy per split and question type on such clips
  stllm-index train CONFIG.yaml      fine-tune with the original's recipe (masking + MVM) on a manifest
  stllm-index demo-model             rebuild the shipped world model from scratch (make demo-model)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from pipeline.report import terminal

RUN_EXIT_STATUS = """exit status:
  0  the run succeeded; also when every video of the source was indexed already (nothing new)
  1  the run failed, indexed none of its new videos, or more than runtime.max_error_fraction of them failed
  2  invalid job file, or a source that does not exist or cannot be listed (nothing written, Ray not started)
  3  the source holds no file with one of source.extensions (a warning names the source and the extensions
     searched; nothing written)"""


def _quiet(verbose: bool) -> None:
    # Keep the terminal readable: library progress bars and info logs are noise for a CLI user.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--decoding", choices=["greedy", "original"], default="greedy",
                   help="original = the original's 5 beams and 300 new tokens (flags given here win)")
    g.add_argument("--prompt", choices=["conversation", "qa", "mvbench"], default=None,
                   help="prompt preset: conversation (system text), qa (none, as MSVD/MSRVTT-QA), mvbench "
                        "(default: the one the model was trained with, qa for 'world'; else conversation)")
    g.add_argument("--system", default=None, help="free system text instead of the preset's ('' = none)")
    g.add_argument("--answer-prefix", default=None, help="text the answer starts with, e.g. 'Best option:('")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (300 with --decoding original)")
    g.add_argument("--num-beams", type=int, default=None, help="default 1 (5 with --decoding original)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=None, help="default: the checkpoint's (1.5)")
    g.add_argument("--seed", type=int, default=None)


def _prompt_preset(args: argparse.Namespace, model: str, fallback: str = "conversation") -> str:
    """--prompt, else the preset `model` was trained with, else `fallback`; a mismatch is warned about."""
    from pipeline.model_names import preset_warning, trained_preset

    preset = args.prompt or trained_preset(model) or fallback
    if warning := preset_warning(model, preset):
        print(f"warning: {warning}", file=terminal("err"))
    return preset


def _generation_options(args: argparse.Namespace, preset: str | None = None):
    from stllm.engine import decoding_preset
    from stllm.prompts import prompt_format

    given = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("num_beams", args.num_beams)) if v is not None}
    return decoding_preset(
        args.decoding, **given, do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
        prompt=prompt_format(preset or args.prompt or "conversation", system=args.system,
                             answer_prefix=args.answer_prefix),
    )


def cmd_convert(args: argparse.Namespace) -> int:
    from stllm.convert import convert_checkpoint

    t0 = time.perf_counter()
    dst = convert_checkpoint(
        args.src, args.dst, video_input=args.video_input, residual_size=args.residual_size,
        num_frames=args.frames, dtype=args.dtype, vision_heads=args.vision_heads, qformer_heads=args.qformer_heads,
        qformer_tokenizer=args.qformer_tokenizer,
    )
    cfg = json.loads((dst / "config.json").read_text())
    print(f"converted {args.src} → {dst} in {time.perf_counter() - t0:.1f}s "
          f"(video_input={cfg['video_input']}, frames={cfg['num_frames']}, btadapter_depth={cfg['btadapter_depth']})",
          file=terminal())
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from pipeline.decode import DecodeError, decode_video
    from pipeline.model_names import DEFAULT_ASK_MODEL, NAMED_MODELS
    from pipeline.paths import resolve_model_path
    from stllm import load_engine
    from stllm.configuration_stllm import STLLMConfig
    from stllm.engine import VideoRequest

    t0 = time.perf_counter()
    model = args.model or DEFAULT_ASK_MODEL
    options = _generation_options(args, _prompt_preset(args, model))  # bad flags fail before anything loads
    model_dir = Path(resolve_model_path(model))
    if not args.model:
        print(f"(no --model given: {NAMED_MODELS[model].what}; --model takes your converted checkpoint)",
              file=terminal("err"))
    config = STLLMConfig.from_pretrained(model_dir)
    sampling = args.frame_sampling or config.frame_sampling
    try:  # the video first: a bad file fails before the engine starts
        data = Path(args.video).read_bytes()
        video = decode_video(data, num_frames=args.frames or config.num_frames, size=config.image_size,
                             timeout_s=args.decode_timeout, sampling=sampling)
    except OSError as e:
        raise ValueError(f"cannot read {args.video}: {e.strerror or e}") from None
    except DecodeError as e:
        raise ValueError(f"cannot decode {args.video}: {e}") from None
    t1 = time.perf_counter()
    engine = load_engine(args.engine, str(model_dir), dtype=args.dtype, device=args.device)
    t2 = time.perf_counter()
    request = VideoRequest(args.video, video.frames, [args.question], sampled=True)
    try:
        [result] = engine.generate([request], options)
    finally:
        engine.close()  # inside the quiet output: vLLM's shutdown notices go to the log too
    t3 = time.perf_counter()
    if result.error:
        print(f"error: {result.error}", file=terminal("err"))
        return 1
    answer = result.answers[0]
    if args.json:
        print(json.dumps({
            "video": args.video, "question": args.question, "answer": answer.text,
            "token_ids": answer.token_ids, "frame_indices": list(video.frame_indices),
            "frame_sampling": sampling, "prompt": options.prompt.name, "num_beams": options.num_beams,
            "decoder": video.decoder, "engine": args.engine, "model": str(model_dir),
            "timings_s": {"decode": round(t1 - t0, 3), "load": round(t2 - t1, 3), "generate": round(t3 - t2, 3)},
        }, indent=2), file=terminal())
    else:
        print(answer.text, file=terminal())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo.run import run_demo

    return run_demo(workdir=Path(args.workdir) if args.workdir else None)


def cmd_demo_model(args: argparse.Namespace) -> int:
    from pipeline.paths import world_model_dir
    from pipeline.training.world_model import WorldRecipe, build_demo_model

    t0 = time.perf_counter()
    recipe = WorldRecipe(video_input=args.video_input, stage2_overrides=args.set or [])
    dst = Path(args.out) if args.out else world_model_dir()
    report = build_demo_model(args.workdir, dst, recipe, progress=not args.no_progress, stage1=args.stage1)
    out = terminal()
    print(f"model: {dst} ({time.perf_counter() - t0:.0f}s: {json.dumps(report['times'])})", file=out)
    for split, rep in report["eval"].items():
        cells = "  ".join(f"{q} {acc:.2f}" for q, acc in rep["accuracy"].items())
        print(f"  {split:8s} {cells}", file=out)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.jobs import JobError, job_warnings, load_job
    from pipeline.preflight import EXIT_NO_VIDEOS, NoVideos
    from pipeline.runner import exit_status, run_job

    # the flags are overrides of job fields: validated as the job file's own values are
    flags = [*([f"source.limit={args.limit}"] if args.limit is not None else []),
             *([f"runtime.metrics_port={args.metrics_port}"] if args.metrics_port is not None else [])]
    try:
        job = load_job(args.job, [*(args.set or []), *flags])
    except JobError as e:
        print(f"invalid job {args.job}:\n{e}", file=terminal("err"))
        return 2
    for warning in job_warnings(job):
        print(f"warning: {warning}", file=terminal("err"))
    try:
        manifest = run_job(job, address=args.address, progress=not args.no_progress,
                           retry_errors=args.retry_errors, where=args.where, summary=True)
    except NoVideos as e:
        print(f"warning: {e}\nnothing indexed, nothing written (exit status {EXIT_NO_VIDEOS})", file=terminal("err"))
        return EXIT_NO_VIDEOS
    # Per-video failures are in the error ledger; the run fails when it indexed none of its new videos or more
    # than runtime.max_error_fraction of them failed (a run with nothing new succeeds).
    return exit_status(manifest, job.runtime.max_error_fraction)


def cmd_status(args: argparse.Namespace) -> int:
    """Last runs (from their manifests), the index's row counts, the error ledger by type."""
    from pipeline.index_status import index_status, print_status

    status = index_status(args.index, runs=args.runs, manifest_dir=args.manifest_dir)
    if args.json:
        print(json.dumps(status, indent=2, default=str), file=terminal())
    else:
        print_status(status)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Unregister a job and/or drop superseded cells; prints what goes (nothing changes with --dry-run)."""
    from pipeline.index_status import locate
    from pipeline.io.sources import S3Options, is_s3
    from pipeline.store.prune import prune

    if not args.job and not args.superseded:
        raise ValueError("prune: say what to prune: --job NAME and/or --superseded")
    loc = locate(args.index, S3Options() if is_s3(args.index) else None)
    report = prune(loc, job=args.job, superseded=args.superseded, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report, indent=2), file=terminal())
        return 0
    verb = "would go" if args.dry_run else "gone"
    out = terminal()
    if report["jobs"]:
        print(f"job {report['jobs'][0]}: unregistered ({verb}); its questions leave the view"
              + ("" if args.dry_run else f" ({report['views_rebuilt']} view rows rebuilt)"), file=out)
    cells = sum(report["cells"].values())
    by = ", ".join(f"{k} {v}" for k, v in sorted(report["cells"].items())) or "none"
    models = ", ".join(f"{k} {v}" for k, v in sorted(report["models"].items()))
    print(f"superseded cells {verb}: {cells} ({by}){f'; by model: {models}' if models else ''}", file=out)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.training.world import synth

    t0 = time.perf_counter()
    report = synth(args.out, args.n, seed=args.seed, splits=args.splits.split(","), n_frames=args.frames,
                   fps=args.fps, size=args.size)
    clips = ", ".join(f"{k} {v}" for k, v in report["clips"].items())
    print(f"wrote {clips} clips ({report['rows']} manifest rows) to {args.out} in {time.perf_counter() - t0:.1f}s; "
          f"truth in {report['manifest']}", file=terminal())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.paths import resolve_model_path
    from pipeline.training.world import evaluate

    # `train` teaches the qa layout (no system text): the default for a checkpoint we know nothing of
    options = _generation_options(args, _prompt_preset(args, args.model, fallback="qa"))
    report = evaluate(resolve_model_path(args.model), args.manifest, engine=args.engine, limit=args.limit,
                      dtype=args.dtype, device=args.device, answers_out=args.answers, options=options)
    if args.json:
        print(json.dumps(report, indent=2), file=terminal())
        return 0
    out = terminal()
    print(f"{report['clips']} clips, {args.engine} engine, model {report['model']}", file=out)
    for split, rep in report["splits"].items():
        cells = "  ".join(f"{q} {acc:.2f} ({rep['counts'][q]})" for q, acc in rep["accuracy"].items())
        print(f"  {split:8s} {cells}", file=out)
    for s in report["skipped"]:
        print(f"  skipped {s['uri']}: {s['error']}", file=out)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.training.train import load_train_config, train

    config = load_train_config(args.config, args.set or [])  # an invalid config fails before any work
    t0 = time.perf_counter()
    report = train(config, resume=args.resume, progress=not args.no_progress)
    out = terminal()
    trainable = ", ".join(f"{k} {v:,}" for k, v in report["trainable"].items())
    print(f"trained {report['steps']}/{report['total_steps']} steps on {report['samples']} samples "
          f"({report['skipped']} clips skipped) in {time.perf_counter() - t0:.0f}s; trainable: {trainable}", file=out)
    if report["last"]:
        print(f"last step: {json.dumps(report['last'])}", file=out)
    if report["model"]:
        print(f"model: {report['model']}", file=out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stllm-index", description="Index video archives with ST-LLM.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert released ST-LLM weights (folder or hub id) to our format")
    c.add_argument("src", help="released folder (pytorch_model-*.bin / *.safetensors) or hub id")
    c.add_argument("dst", help="output folder (safetensors)")
    c.add_argument("--video-input", choices=["all", "mean", "residual"], default=None,
                   help="default: residual when the checkpoint has the global MLP, else all")
    c.add_argument("--residual-size", type=int, default=16)
    c.add_argument("--frames", type=int, default=None, help="frames sampled per video (default 64 residual, 16 all)")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast the weights (default: keep the checkpoint's; float16 is refused where a value "
                        "would overflow)")
    c.add_argument("--vision-heads", type=int, default=16, help="ViT attention heads (EVA-g: 16 heads of 88)")
    c.add_argument("--qformer-heads", type=int, default=12, help="Q-Former attention heads (BERT-base: 12 of 64)")
    c.add_argument("--qformer-tokenizer", default=None,
                   help="BERT uncased tokenizer folder (default: the hub's bert-base-uncased when converting "
                        "from the hub, else the local HF cache, else the vocabulary shipped with the package)")
    c.set_defaults(func=cmd_convert)

    a = sub.add_parser("ask", help="answer one question about one video")
    a.add_argument("video")
    a.add_argument("question")
    a.add_argument("--model", help="converted checkpoint folder (`stllm-index convert`), or 'world': the shipped "
                   "synthetic-world model, which knows only the coloured moving shapes of `stllm-index synth` clips "
                   "(the default), or 'tiny': a tiny RANDOM model for tests (answers are noise)")
    a.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    a.add_argument("--frames", type=int, default=None, help="frames to sample (default: the model's)")
    a.add_argument("--frame-sampling", choices=["original", "midpoint"], default=None,
                   help="default: the checkpoint's (original: min(n, T) frames, as the original's chat path)")
    a.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    a.add_argument("--device", default="auto")
    a.add_argument("--decode-timeout", type=float, default=120.0)
    a.add_argument("--json", action="store_true", help="print answer, token ids, frame indices and timings")
    _add_generation_flags(a)
    a.set_defaults(func=cmd_ask)

    r = sub.add_parser("run", help="index the videos of a job file", epilog=RUN_EXIT_STATUS,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("job", help="job YAML (see jobs/)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a job field, e.g. model.engine=vllm")
    r.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local cluster)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")
    r.add_argument("--retry-errors", action="store_true", help="try known-bad videos again (else they are "
                   "skipped while unchanged)")
    r.add_argument("--where", default=None, help="backfill only the indexed videos this SQL on the index's videos "
                   "view selects, e.g. \"duration_s > 60\" or \"uri LIKE 's3://b/2026/%%'\" (the others and new videos "
                   "wait for a later run)")
    r.add_argument("--limit", type=int, default=None, help="at most N videos get new work this run (source.limit); "
                   "the next run goes on where it stopped")
    r.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port while "
                   "the run goes (runtime.metrics_port; 0: any free port, printed)")
    r.set_defaults(func=cmd_run)

    st = sub.add_parser("status", help="last runs, counts and errors of an index")
    st.add_argument("index", help="the job's output.parquet root or output.lancedb folder (local or s3://)")
    st.add_argument("--runs", type=int, default=5, help="how many of the last runs to show")
    st.add_argument("--manifest-dir", default=None, help="where the run manifests are (default: where the index's "
                    "runs recorded them, i.e. the job's output.manifest_dir; else <index>/_manifests)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    pr = sub.add_parser("prune", help="unregister a job, drop cells no job asks for (history), with a dry run")
    pr.add_argument("index", help="the job's output.parquet root or output.lancedb folder (local or s3://)")
    pr.add_argument("--job", default=None, help="unregister this job: its questions leave the view (rebuilt from "
                    "the cells, no model work); its cells stay unless --superseded")
    pr.add_argument("--superseded", action="store_true", help="delete cells no registered job asks for (earlier "
                    "models, dropped questions, old prompts) where the current result is there")
    pr.add_argument("--dry-run", action="store_true", help="say what would go; change nothing")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_prune)

    from pipeline.catalog.commands import add_commands

    add_commands(sub)  # search, similar, export, serve

    sy = sub.add_parser("synth", help="synthetic-world clips with known content and the truth about them")
    sy.add_argument("out", help="output folder (clips/<split>/…, manifest.parquet, manifest.jsonl, scenes.jsonl)")
    sy.add_argument("--n", type=int, required=True, help="clips per split")
    sy.add_argument("--seed", type=int, default=0, help="scenes are a function of (seed, split, index)")
    sy.add_argument("--splits", default="train,heldout,unseen",
                    help="train, heldout (fresh draws), unseen (held-out shape/colour pairs); comma-separated")
    sy.add_argument("--frames", type=int, default=16)
    sy.add_argument("--fps", type=int, default=8)
    sy.add_argument("--size", type=int, default=64, help="frame width = height, pixels (even)")
    sy.set_defaults(func=cmd_synth)

    ev = sub.add_parser("eval", help="grade a model on a synthetic-world (or any) manifest")
    ev.add_argument("model", help="converted checkpoint folder, or 'world' (the shipped synthetic-world model)")
    ev.add_argument("manifest", help="manifest.parquet / .jsonl, or the folder `synth` wrote")
    ev.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    ev.add_argument("--limit", type=int, default=None, help="at most this many clips")
    ev.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--answers", default=None, help="write every graded answer here (JSONL)")
    ev.add_argument("--json", action="store_true")
    _add_generation_flags(ev)
    ev.set_defaults(func=cmd_eval, max_new_tokens=24)

    t = sub.add_parser("train", help="fine-tune a checkpoint on a manifest (the original's recipe by default)")
    t.add_argument("config", nargs="?", default=None, help="training config YAML (see jobs/training/world.yaml)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. lr=1e-4")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    dm = sub.add_parser("demo-model", help="rebuild the shipped synthetic-world model from scratch (make demo-model)")
    dm.add_argument("--workdir", default="runs/demo-model", help="clips, stage folders and logs")
    dm.add_argument("--out", default=None, help="where the model goes (default: the shipped stllm/world/demo_model)")
    dm.add_argument("--video-input", choices=["all", "mean", "residual"], default="residual")
    dm.add_argument("--stage1", default=None, help="reuse this pretrained vision tower instead of stage 1")
    dm.add_argument("--set", action="append", metavar="KEY=VALUE", help="stage-2 (world.yaml) override")
    dm.add_argument("--no-progress", action="store_true")
    dm.set_defaults(func=cmd_demo_model)

    d = sub.add_parser("demo", help="offline demo: synthetic-world clips indexed with the shipped world model")
    d.add_argument("--workdir", default=None)
    d.set_defaults(func=cmd_demo)
    return p


def _log_path(command: str) -> Path:
    """index_home()/logs/<command>-<time>-<pid>.log; the newest 20 are kept."""
    from pipeline.paths import index_home

    folder = index_home() / "logs"
    if folder.is_dir():
        for old in sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)[:-19]:
            old.unlink(missing_ok=True)
    return folder / f"{command}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"


def main(argv: list[str] | None = None) -> int:
    from pipeline.report import quiet_output

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    _quiet(args.verbose)
    # Libraries' notices (Ray, vLLM, their worker processes) go to a log file unless -v.
    log = None if args.verbose else _log_path(args.command)
    code = 2
    try:
        with quiet_output(log):
            code = args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=terminal("err"))
    if code != 0 and log is not None and log.exists() and log.stat().st_size:
        print(f"(library output of this command: {log})", file=terminal("err"))
    return code


if __name__ == "__main__":
    sys.exit(main())
