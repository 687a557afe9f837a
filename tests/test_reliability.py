"""Nightly runs over a real archive, against real parts (SeaweedFS, Ray, LanceDB, real processes killed with
SIGKILL / SIGSTOP): copies, known-bad files, capped runs, crashes of the driver and of actors, storage pauses
and outages, two runs at once, credentials. Every test checks the two stores hold exactly one current row per
object (DuckDB reads the Parquet files knowing nothing of our rules)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from pipeline.demo.clips import make_corrupt_video, make_test_video
from tests.faults import cli_held_at, cli_killed_at

REPO = Path(__file__).parents[1]
TAG = "STLLM_RELIABILITY_TEST"
os.environ.setdefault(TAG, uuid.uuid4().hex)  # inherited by this module's Ray processes: found by tag, not name


@contextlib.contextmanager
def alongside(fn):
    """Run fn(stop) in a thread while the block runs; then stop it and wait for it (no fault injector may
    outlive its test: it would hit the next test's processes)."""
    stop = threading.Event()
    t = threading.Thread(target=fn, args=(stop,), daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(60)


def _free_box(n: int) -> bytes:
    """An MP4 `free` box of n bytes (n >= 8): padding every decoder skips."""
    return struct.pack(">I", n) + b"free" + b"\0" * (n - 8)


def _clips(folder: Path, n: int, seed0: int = 0) -> list[Path]:
    return [make_test_video(folder / f"clip{i:02d}.mp4", "h264", n_frames=12, size=(64, 48), seed=seed0 + i)
            for i in range(n)]


def _overrides(src: str, out: Path | str, extra: tuple[str, ...] = ()) -> list[str]:
    return [f"source.uri={src}", f"output.parquet={out}/parquet", f"output.lancedb={out}/lancedb",
            f"output.manifest_dir={out}/runs", "runtime.decode_cpus=0.5", "runtime.model_cpus=0.5",
            "runtime.batch_size=2", "runtime.commit_every=4", "model.max_new_tokens=4", *extra]


def _s3_section(server) -> str:
    return (f"{{endpoint_url: '{server.endpoint}', access_key_id: '{server.access_key}', "
            f"secret_access_key: '{server.secret_key}', max_attempts: 10, read_timeout_s: 5, connect_timeout_s: 2}}")


def _run(overrides: list[str], **kwargs):
    from pipeline.jobs import load_job
    from pipeline.runner import run_job

    return run_job(load_job(None, overrides), progress=False, **kwargs)


def _exactly_once(out: str, s3=None) -> tuple[list[dict], list[dict]]:
    """(view rows, ledger rows); asserts one view row per object and one cell per key in Parquet and LanceDB, and the
    same rows in both."""
    import duckdb

    from pipeline.store.files import read_parquet
    from pipeline.store.lance import connect_lance

    videos = read_parquet(f"{out}/parquet/videos", s3=s3)
    errors = read_parquet(f"{out}/parquet/errors", s3=s3)
    db = connect_lance(f"{out}/lancedb", s3)
    lance = db.open_table("videos").to_arrow()
    lance_errors = db.open_table("errors").to_arrow() if "errors" in db.table_names() else None
    rows = videos.to_pylist() if videos is not None else []
    ledger = errors.to_pylist() if errors is not None else []
    keys = [r["video_id"] for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows in Parquet"
    assert sorted(keys) == sorted(lance.column("video_id").to_pylist()), "Parquet and LanceDB disagree"
    assert len({r["video_id"] for r in ledger}) == len(ledger), "duplicate ledger records"
    assert (lance_errors.num_rows if lance_errors is not None else 0) == len(ledger)
    if s3 is None and rows:  # a plain reader of the files: no duplicates without knowing our rules
        dup = duckdb.sql(f"SELECT video_id, count(*) n FROM read_parquet('{out}/parquet/videos/*.parquet')"
                         " GROUP BY ALL HAVING n > 1").fetchall()
        assert dup == []
        cells = duckdb.sql(f"SELECT cell_id, count(*) n FROM read_parquet('{out}/parquet/cells/*.parquet')"
                           " GROUP BY ALL HAVING n > 1").fetchall()
        assert cells == []
    return rows, ledger


@pytest.fixture(scope="module", autouse=True)
def _ray_once():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


# ---- identity: copies, known-bad files, changed files, capped runs ---------------------------------------


def test_copies_never_crash_and_the_model_runs_once_per_content(s3_server, tmp_path: Path) -> None:
    """200 objects holding 8 distinct contents (copies under other keys): one model call per content."""
    bucket = s3_server.bucket("copies")
    client = s3_server.client()
    clips = _clips(tmp_path / "clips", 8)
    for i in range(200):
        client.put_object(Bucket=bucket, Key=f"archive/{i % 7}/v{i:03d}.mp4", Body=clips[i % 8].read_bytes())
    s3 = _s3_section(s3_server)
    out = tmp_path / "out"
    manifest = _run(_overrides(f"s3://{bucket}/archive", out, (f"source.s3={s3}", "source.page_size=50")))
    c = manifest["counts"]
    assert (c["listed"], c["indexed"], c["copies"], c["errors"], c["model_calls"]) == (200, 8, 192, 0, 8), c
    rows, _ = _exactly_once(str(out))
    assert len(rows) == 200 and len({r["uri"] for r in rows}) == 200  # every copy is findable
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["content_id"], []).append(r)
    assert sorted(len(g) for g in groups.values()) == [25] * 8
    for g in groups.values():
        own = [r for r in g if r["copy_of"] is None]
        assert len(own) == 1 and {r["copy_of"] for r in g if r["copy_of"]} == {own[0]["video_id"]}
        assert len({r["caption"] for r in g}) == 1
    again = _run(_overrides(f"s3://{bucket}/archive", out, (f"source.s3={s3}", "source.page_size=50")))
    assert (again["counts"]["skipped"], again["counts"]["model_calls"]) == (200, 0)


def _pad_to(path: Path, size: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data + _free_box(size - len(data)))


def test_known_bad_files_are_skipped_until_retried_or_changed(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    good = _clips(src, 2)
    for i in range(6):
        make_corrupt_video(src / f"bad{i}.mp4", "random" if i % 2 else "truncated")
    # Two different files with the same size and mtime (as `cp -p` leaves them): two objects, two contents.
    a, b = make_test_video(src / "same_a.mp4", "h264", seed=11), make_test_video(src / "same_b.mp4", "h264", seed=12)
    size = max(a.stat().st_size, b.stat().st_size) + 64
    _pad_to(a, size)
    _pad_to(b, size)
    os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    first = _run(_overrides(str(src), out))
    assert (first["counts"]["indexed"], first["counts"]["errors"]) == (4, 6)
    rows, ledger = _exactly_once(str(out))
    by_name = {Path(r["uri"]).name: r for r in rows}
    assert by_name["same_a.mp4"]["content_id"] != by_name["same_b.mp4"]["content_id"]
    assert by_name["same_a.mp4"]["copy_of"] is None and by_name["same_b.mp4"]["copy_of"] is None
    assert len(ledger) == 6 and {e["attempts"] for e in ledger} == {1}

    second = _run(_overrides(str(src), out))  # nothing new: no decode, no Ray, no new error records
    assert (second["counts"]["known_bad"], second["counts"]["errors"], second["counts"]["skipped"]) == (6, 0, 4)
    assert len(_exactly_once(str(out))[1]) == 6

    third = _run(_overrides(str(src), out), retry_errors=True)
    assert third["counts"]["errors"] == 6
    _, ledger = _exactly_once(str(out))
    assert len(ledger) == 6 and {e["attempts"] for e in ledger} == {2}
    assert all(e["first_seen"] < e["last_seen"] for e in ledger)

    shutil.copyfile(good[0], src / "bad0.mp4")  # a known-bad file that changed is tried again
    fourth = _run(_overrides(str(src), out))
    assert (fourth["counts"]["indexed"] + fourth["counts"]["copies"], fourth["counts"]["known_bad"]) == (1, 5)
    rows, ledger = _exactly_once(str(out))
    assert len(rows) == 5 and len(ledger) == 5 and "bad0.mp4" in {Path(r["uri"]).name for r in rows}


def test_limit_caps_new_work_and_advances(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _clips(src, 5, seed0=20)
    seen = []
    for _ in range(3):
        m = _run(_overrides(str(src), out, ("source.limit=2",)))
        seen.append(m["counts"]["indexed"])
    assert seen == [2, 2, 1]
    rows, _ = _exactly_once(str(out))
    assert len(rows) == 5


# ---- crashes -----------------------------------------------------------------------------------------


def _cli_run(job: Path, env: dict[str, str] | None = None, timeout: int = 600, extra: tuple[str, ...] = ()) \
        -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _job_file(tmp_path: Path, overrides: list[str]) -> Path:
    import yaml

    from pipeline.job_overrides import apply_overrides
    from pipeline.jobs import default_job_text

    data = apply_overrides(yaml.safe_load(default_job_text()), overrides)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_killed_driver_then_rerun_is_exactly_once(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _clips(src, 10, seed0=40)
    make_corrupt_video(src / "broken.mp4", "random")
    job = _job_file(tmp_path, _overrides(str(src), out, ("runtime.commit_every=2",)))
    # Killed by SIGKILL right after its second LanceDB commit, before the Parquet files are in place.
    crashed = subprocess.run([sys.executable, "-c", cli_killed_at("lance-committed", 2, str(REPO)), "run", str(job),
                              "--no-progress"], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "STLLM_INDEX_HOME": str(tmp_path)})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    # Killed from outside while it runs (a second crash on top of the first's leftovers).
    env = {**os.environ, "STLLM_INDEX_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job), "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    parts, runs = out / "parquet" / "videos", out / "runs"
    while time.monotonic() < deadline and len(list(runs.glob("*.json"))) < 2:
        time.sleep(0.1)  # its manifest: it has recovered the first run's leftovers and started
    before = {p.name for p in parts.glob("*.parquet")}
    while time.monotonic() < deadline and {p.name for p in parts.glob("*.parquet")} <= before:
        time.sleep(0.1)  # then one commit of its own
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
    proc.wait(30)
    done = _cli_run(job, env={"STLLM_INDEX_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    rows, ledger = _exactly_once(str(out))
    assert len(rows) == 10 and [Path(e["uri"]).name for e in ledger] == ["broken.mp4"]
    from pipeline.store.manifest import list_manifests

    statuses = [m["status"] for m in list_manifests(str(out / "runs"))]
    assert statuses[-1] == "succeeded" and len(statuses) == 3


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (all its threads' children)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _tagged_pids(needle: str) -> list[int]:
    """This module's Ray worker processes whose title holds `needle` (found by our tag in their environment)."""
    pids = []
    tag = f"{TAG}={os.environ[TAG]}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if tag in (entry / "environ").read_bytes().split(b"\0") and needle.encode() in (
                    entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_killed_model_and_decode_actors_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _clips(src, 16, seed0=60)
    killed: list[str] = []

    def ready_pids(needle: str) -> list[int]:
        # The title without ".__init__": the actor is constructed and takes batches now.
        return [p for p in _tagged_pids(needle) if b"__init__" not in Path(f"/proc/{p}/cmdline").read_bytes()]

    def kill_decode(stop: threading.Event) -> None:
        while not stop.is_set():  # while it decodes its first batches
            if pids := ready_pids("MapBatches(DecodeStage)"):
                os.kill(pids[0], signal.SIGKILL)
                killed.append("MapBatches(DecodeStage)")
                return
            time.sleep(0.05)

    def kill_model_at_first_commit(point: str, _table: str) -> None:
        # The writer's first commit (2 of 16 rows): the model stage has most of its work ahead, whatever the
        # machine's speed. Run in the writer's thread, so no timing decides whether the kill happens mid-run.
        if point == "lance-committed" and "MapBatches(ModelStage)" not in killed:
            if pids := ready_pids("MapBatches(ModelStage)"):
                os.kill(pids[0], signal.SIGKILL)
                killed.append("MapBatches(ModelStage)")

    from pipeline.store.commit import COMMIT_HOOKS

    COMMIT_HOOKS.append(kill_model_at_first_commit)
    try:
        with alongside(kill_decode):
            # one video at a time through the model, in blocks of a row or two (a small rows-in-flight budget)
            manifest = _run(_overrides(str(src), out, ("runtime.commit_every=2", "model.max_new_tokens=24",
                                                       "runtime.batch_size=1", "runtime.model_batches_in_flight=1",
                                                       "runtime.buffer_mb=16")))
    finally:
        COMMIT_HOOKS.remove(kill_model_at_first_commit)
    assert killed == ["MapBatches(DecodeStage)", "MapBatches(ModelStage)"]
    rows, _ = _exactly_once(str(out))
    assert len(rows) == 16 and manifest["counts"]["errors"] == 0 and manifest["status"] == "succeeded"


def test_a_dead_vllm_engine_restarts_the_model_actor(tmp_path: Path) -> None:
    """The vLLM engine core dies mid-run (SIGKILL): the model actor sees its engine is gone, exits, and Ray
    restarts it with a fresh engine and retries the batch — no row becomes an error, none is lost."""
    src, out = tmp_path / "src", tmp_path / "out"
    _clips(src, 10, seed0=140)
    killed: list[int] = []

    def kill_engine(stop: threading.Event) -> None:
        while not stop.is_set():  # once the model actor is up (its engine is ready), kill the engine core
            ready = [p for p in _tagged_pids("MapBatches(ModelStage)")
                     if b"__init__" not in Path(f"/proc/{p}/cmdline").read_bytes()]
            cores = _tagged_pids("EngineCore")
            if ready and cores:
                orphans.extend(_children(cores[0]))  # its worker: killing the core does not stop it
                os.kill(cores[0], signal.SIGKILL)
                killed.append(cores[0])
                return
            time.sleep(0.05)

    orphans: list[int] = []
    try:
        with alongside(kill_engine):
            manifest = _run(_overrides(str(src), out, ("model.engine=vllm", "runtime.commit_every=2",
                                                       "runtime.model_cpus=1.0", "model.max_new_tokens=16")))
    finally:
        for pid in orphans:  # the dead core's worker, left to init: stopped here, by its process id
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert killed, "the engine core was never seen"
    rows, ledger = _exactly_once(str(out))
    assert len(rows) == 10 and ledger == [] and manifest["counts"]["errors"] == 0


# ---- storage faults ----------------------------------------------------------------------------------


def test_storage_paused_then_back_completes(private_s3, tmp_path: Path) -> None:
    server = private_s3.server
    bucket = server.bucket("paused")
    for i, clip in enumerate(_clips(tmp_path / "clips", 8, seed0=80)):
        server.client().upload_file(str(clip), bucket, f"in/{i}.mp4")
    s3 = _s3_section(server)
    out = f"s3://{bucket}/out"
    opts = server.options()
    paused: list[float] = []

    client = server.client()

    def pause_once(stop: threading.Event) -> None:
        while not stop.is_set():  # the run's first commit (its cells come first): the run is under way
            if client.list_objects_v2(Bucket=bucket, Prefix="out/parquet/cells/part-").get("KeyCount"):
                break
            time.sleep(0.05)
        else:
            return
        private_s3.pause()  # the whole server: every S3 call of the run hangs
        paused.append(time.time())
        time.sleep(20)
        private_s3.resume()

    with alongside(pause_once):
        manifest = _run(_overrides(f"s3://{bucket}/in", out, (f"source.s3={s3}", f"output.s3={s3}",
                                                             "runtime.commit_every=2", "model.max_new_tokens=16")))
    assert manifest["status"] == "succeeded" and manifest["counts"]["indexed"] == 8, manifest["counts"]
    from datetime import datetime

    finished = datetime.fromisoformat(manifest["finished_at"]).timestamp()
    assert paused and finished - paused[0] >= 20  # the run was still going and waited the pause out
    rows, ledger = _exactly_once(out, s3=opts)
    assert len(rows) == 8 and ledger == []


def test_storage_down_fails_clearly_and_the_rerun_resumes(private_s3, tmp_path: Path) -> None:
    server = private_s3.server
    bucket = server.bucket("down")
    for i, clip in enumerate(_clips(tmp_path / "clips", 12, seed0=90)):
        server.client().upload_file(str(clip), bucket, f"in/{i}.mp4")
    quick = (f"{{endpoint_url: '{server.endpoint}', access_key_id: '{server.access_key}', "
             f"secret_access_key: '{server.secret_key}', max_attempts: 2, read_timeout_s: 2, connect_timeout_s: 1}}")
    runs = tmp_path / "runs"
    overrides = _overrides(f"s3://{bucket}/in", f"s3://{bucket}/out",
                           (f"source.s3={quick}", f"output.s3={quick}", f"output.manifest_dir={runs}",
                            "runtime.commit_every=2", "model.max_new_tokens=24"))
    from pipeline.store.manifest import list_manifests

    stopped: list[float] = []
    marker = tmp_path / "held"

    def stop_at_first_commit(stop: threading.Event) -> None:
        while not stop.is_set():  # the writer holds once its first videos are committed: the run is under way
            if marker.exists():
                private_s3.kill()
                stopped.append(time.time())
                marker.unlink()  # let the writer go on, into a store that is gone
                return
            time.sleep(0.05)

    job = _job_file(tmp_path, overrides)
    with alongside(stop_at_first_commit):  # the nightly run, as its own process
        failed_run = subprocess.run(
            [sys.executable, "-c", cli_held_at("lance-committed", str(marker), "videos", str(REPO)), "run", str(job),
             "--no-progress"], capture_output=True, text=True, timeout=600,
            env={**os.environ, "STLLM_INDEX_HOME": str(tmp_path)})
    assert stopped and failed_run.returncode != 0
    assert "error" in failed_run.stderr.lower() and server.secret_key not in failed_run.stderr
    failed = list_manifests(str(runs))[-1]
    assert failed["status"] == "failed" and failed["error"]
    assert server.secret_key not in json.dumps(failed)
    private_s3.start()  # back on the same ports, with the same data
    t0 = time.monotonic()
    resumed = _run(overrides)  # the crashed run's lock (its process is gone) does not hold it up
    assert resumed["status"] == "succeeded" and time.monotonic() - t0 < 120
    rows, _ = _exactly_once(f"s3://{bucket}/out", s3=server.options())
    assert len(rows) == 12
    assert resumed["counts"]["skipped"] >= 2  # what the failed run committed was kept


# ---- two runs at once, credentials, memory ------------------------------------------------------------------


def test_two_runs_at_once_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _clips(src, 8, seed0=100)
    job = _job_file(tmp_path, _overrides(str(src), out, ("runtime.commit_every=2",)))
    env = {**os.environ, "STLLM_INDEX_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job), "--no-progress"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    rows, _ = _exactly_once(str(out))
    assert len(rows) == 8
    from pipeline.store.manifest import list_manifests

    runs = list_manifests(str(out / "runs"))
    assert len(runs) == 2 and all(r["status"] == "succeeded" for r in runs)
    for r in runs:  # each says what it did: the other's commits show up as skipped, or both did the work
        c = r["counts"]
        assert c["listed"] == 8 and c["indexed"] + c["skipped"] + c["copies"] >= 1


def test_credentials_never_appear_in_any_output_or_log(s3_server, tmp_path: Path) -> None:
    bucket = s3_server.bucket("secret")
    clips = _clips(tmp_path / "clips", 2, seed0=120)
    for i, clip in enumerate(clips):
        s3_server.client().upload_file(str(clip), bucket, f"in/{i}.mp4")
    s3_server.client().put_object(Bucket=bucket, Key="in/broken.mp4", Body=b"\0" * 500)
    import tempfile

    out = tmp_path / "out"
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short
    job = _job_file(tmp_path, _overrides(f"s3://{bucket}/in", out, (f"source.s3={_s3_section(s3_server)}",)))
    env = {"STLLM_INDEX_HOME": str(tmp_path / "home"), "RAY_TMPDIR": str(ray_tmp)}
    res = _cli_run(job, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(out / "parquet"),
                             "--manifest-dir", str(out / "runs")], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "decode" in status.stdout
    secrets = (s3_server.secret_key, s3_server.access_key)
    texts = [res.stdout, res.stderr, status.stdout, status.stderr]
    checked = 0
    for root in (out, tmp_path / "home", ray_tmp):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                checked += 1
                for s in secrets:
                    assert s.encode() not in data, f"{s[:6]}… in {path}"
    for text in texts:
        for s in secrets:
            assert s not in text
    assert checked > 20  # the outputs, manifests, the CLI's log, Ray's session logs
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_fetch_memory_is_bounded_whatever_the_file_size(s3_server, tmp_path: Path) -> None:
    """A 300 MB object (a clip padded with an MP4 `free` box) is spooled to disk and decoded from the file: the
    decode actor's peak memory grows by far less than the object."""
    bucket = s3_server.bucket("big")
    clip = make_test_video(tmp_path / "c.mp4", "h264", n_frames=24, seed=5)
    big = tmp_path / "big.mp4"
    big.write_bytes(clip.read_bytes() + _free_box(300 << 20))
    s3_server.client().upload_file(str(big), bucket, "big.mp4")
    big.unlink()
    o = s3_server.options()
    code = f"""
import json, resource, sys
sys.path.insert(0, {str(REPO)!r})
from pipeline.decode.worker import shared_worker_pid
from pipeline.io.sources import S3Options
from pipeline.stages.decode import DecodeStage
s3 = S3Options(endpoint_url={o.endpoint_url!r}, access_key_id={o.access_key_id!r}, secret_access_key={o.secret!r})
stage = DecodeStage(num_frames=8, image_size=32, timeout_s=120, s3_options=s3)
small = stage.decode_row({{"uri": "s3://{bucket}/big.mp4", "kind": "work"}})  # warm: imports, decode worker
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
row = stage.decode_row({{"uri": "s3://{bucket}/big.mp4", "kind": "work"}})
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
worker_peak = [int(line.split()[1]) for line in open(f"/proc/{{shared_worker_pid()}}/status")
               if line.startswith("VmHWM")][0]
capped = DecodeStage(num_frames=8, image_size=32, timeout_s=120, s3_options=s3, max_bytes=1 << 20)
print(json.dumps([row["error_stage"], row["frames_shape"], (after - before) // 1024, worker_peak // 1024,
                  capped.decode_row({{"uri": "s3://{bucket}/big.mp4", "kind": "work"}})["error_message"]]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    stage, shape, grew_mb, worker_peak_mb, capped = json.loads(res.stdout.strip().splitlines()[-1])
    assert stage is None and shape == [8, 32, 32, 3]  # decoded
    assert grew_mb < 64, res.stdout  # the actor, fetching a 300 MB object
    assert worker_peak_mb < 300, res.stdout  # the decode worker, reading it from the spool file
    assert "over the job's limit" in capped and "source.max_bytes" in capped
