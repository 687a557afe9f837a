"""A run's Prometheus endpoint, scraped while a real run goes (real Ray, hf engine): the counts move, vLLM's and
the writer's names are there; the page's runs view plots the finished run's throughput from its manifest."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from pathlib import Path

from pipeline.demo.clips import make_test_video
from tests.browser import free_port


def _value(text: str, metric: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(metric + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_the_run_serves_metrics_that_move(tmp_path: Path) -> None:
    import ray

    from pipeline.jobs import load_job
    from pipeline.runner import run_job

    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(10):
        make_test_video(src / f"clip{i:02d}.mp4", "h264", n_frames=24, size=(64, 48), seed=500 + i)
    port = free_port()
    job = load_job(None, [f"source.uri={src}", f"output.parquet={out}/parquet", f"output.lancedb={out}/lancedb",
                          f"output.manifest_dir={out}/runs", "runtime.decode_cpus=0.5", "runtime.model_cpus=0.5",
                          # one video at a time through the model, each committed: the counts move for a while
                          "runtime.batch_size=1", "runtime.model_batches_in_flight=1", "runtime.commit_every=1",
                          "runtime.decode_batch_size=1",
                          "model.max_new_tokens=32",
                          f"runtime.metrics_port={port}"])
    done: dict = {}
    run = threading.Thread(target=lambda: done.update(run_job(job, progress=False)), daemon=True)
    ray.shutdown()
    run.start()
    seen: list[float] = []
    last = ""
    try:
        while run.is_alive():
            try:
                last = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                # what the workers report moves while they work, whatever the driver waits for
                rows = sum(_value(last, "stllm_stage_rows_total", stage=s) or 0 for s in ("decode", "model"))
                if not seen or rows != seen[-1]:
                    seen.append(rows)
            except OSError:
                pass  # not serving yet (the model is loading) or done
            time.sleep(0.05)
        run.join()
    finally:
        ray.shutdown()
    assert done["status"] == "succeeded" and done["counts"]["indexed"] == 10
    assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] <= 20, seen  # scraped while the counts moved
    assert _value(last, "stllm_videos_total", state="listed") == 10
    assert _value(last, "stllm_stage_rows_total", stage="decode") is not None
    for name in ("vllm:num_requests_running", "vllm:generation_tokens_total", "stllm_writer_commits_total"):
        assert re.search(rf"^{re.escape(name)}\{{", last, re.M), name
    # the manifest keeps the throughput over time; the runs view plots it
    assert len(done["progress"]) >= 2 and done["progress"][-1][1] == 10
    from pipeline.catalog.serve import progress_plot

    plot = progress_plot({"run_id": done["run_id"], "progress": done["progress"]})
    assert plot["done"] == 10 and len(plot["points"].split()) == len(done["progress"])
