"""Job files: every shipped job validates; bad input is rejected naming the field; --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.job_overrides import JobError, apply_overrides, parse_value
from pipeline.jobs import JobConfig, default_job_text, load_job

ROOT = Path(__file__).resolve().parents[1]
JOB_FILES = sorted((ROOT / "jobs").glob("*.yaml"))


def test_the_shipped_jobs_validate() -> None:
    assert {p.stem for p in JOB_FILES} >= {"demo", "nightly", "catalog", "curation"}
    jobs = [load_job(p) for p in JOB_FILES]
    assert all(isinstance(j, JobConfig) for j in jobs)
    assert len({j.name for j in jobs}) == len(jobs)
    assert len({j.spec(FACTS).spec for j in jobs}) == len(jobs)
    nightly = load_job(ROOT / "jobs" / "nightly.yaml")
    assert (nightly.model.engine, nightly.model.dtype, nightly.model.device) == ("vllm", "bfloat16", "cuda")
    assert nightly.source.uri.startswith("s3://")


def test_the_embedded_default_is_jobs_demo_yaml() -> None:
    assert default_job_text() == (ROOT / "jobs" / "demo.yaml").read_text()
    demo = load_job(None)
    assert demo == load_job(ROOT / "jobs" / "demo.yaml")
    assert demo.model.path == "tiny" and demo.model.engine == "hf" and demo.model.device == "cpu"
    assert len(demo.questions) == 2


@pytest.mark.parametrize(("overrides", "expected"), [
    (["model.engine=tf"], "field 'model.engine': Input should be 'hf' or 'vllm'"),
    (["model.dtype=fp8"], "field 'model.dtype': Input should be 'float32', 'bfloat16' or 'float16'"),
    (["model.device=cuda"], "field 'runtime.num_gpus_per_actor': must be > 0 when model.device is 'cuda'"),
    (["model.top_p=1.5"], "field 'model.top_p': Input should be less than or equal to 1"),
    (["model.path=' '"], "field 'model.path': String should have at least 1 character"),
    (["questions=[a, b, a]"], "field 'questions': duplicate question 'a'"),
    (["questions.1=''"], "field 'questions.1': String should have at least 1 character"),
    (["runtime.batch_size=0"], "field 'runtime.batch_size': Input should be greater than or equal to 1"),
    (["runtime.decode_timeout_s=soon"], "field 'runtime.decode_timeout_s': Input should be a valid number"),
    (["output.parquet=null", "output.lancedb=null"], "field 'output.parquet': set output.parquet, output.l"),
    (["output.errors_table=videos"], "field 'output.errors_table': must differ from output.table"),
    (["source.extensions=[mp4, '']"], "field 'source.extensions': extensions must be non-empty"),
    (["name=has space"], "field 'name': String should match pattern"),
    (["model.temperature=0"], "field 'model.temperature': Input should be greater than 0"),
])
def test_invalid_values_are_rejected_with_field_and_reason(overrides: list[str], expected: str) -> None:
    with pytest.raises(JobError) as e:
        load_job(None, overrides)
    assert expected in str(e.value)


def test_unknown_and_missing_fields(tmp_path: Path) -> None:
    text = default_job_text().replace("model:", "modle:", 1)
    (tmp_path / "typo.yaml").write_text(text)
    with pytest.raises(JobError) as e:
        load_job(tmp_path / "typo.yaml")
    lines = str(e.value).splitlines()
    assert "field 'model': required field is missing" in lines
    allowed = "name, source, model, caption_prompt, questions, prompt, embedder, segments, scores, output, runtime"
    assert f"field 'modle': unknown field (allowed: {allowed})" in lines
    with pytest.raises(JobError, match=r"field 'runtime.decode_timout_s': unknown field \(allowed: address,"):
        load_job(None, ["runtime.decode_timout_s=3"])
    with pytest.raises(JobError, match=r"field 'source.s3.endpoint': unknown field \(allowed: endpoint_url,"):
        load_job(None, ["source.s3.endpoint=http://x"])


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="job file not found"):
        load_job(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(JobError, match="not valid YAML"):
        load_job(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(JobError, match="must be a YAML mapping"):
        load_job(tmp_path / "list.yaml")


def test_set_overrides() -> None:
    job = load_job(None, [
        "model.engine=vllm", "model.num_frames=16", "model.do_sample=true", "model.repetition_penalty=1.5",
        "questions.0=What happens: first, then?", "questions.2=Is it #1?", "runtime.address=auto",
        "source.s3={endpoint_url: 'http://127.0.0.1:9000', region: us-east-1}", "source.limit=null",
        "output.lancedb=s3://b/db", "caption_prompt=\"quoted: text\"",
    ])
    assert job.model.engine == "vllm" and job.model.num_frames == 16 and job.model.do_sample is True
    assert job.model.repetition_penalty == 1.5 and job.runtime.address == "auto"
    assert job.questions == ["What happens: first, then?", "Which direction does it move?", "Is it #1?"]
    assert job.source.s3.endpoint_url == "http://127.0.0.1:9000" and job.source.limit is None
    assert job.caption_prompt == "quoted: text" and job.output.lancedb == "s3://b/db"

    assert parse_value("true") is True and parse_value("3") == 3 and parse_value("0.5") == 0.5
    assert parse_value("null") is None and parse_value("") is None and parse_value("[a, b]") == ["a", "b"]
    assert parse_value("a: b") == "a: b" and parse_value("x #1") == "x #1"
    for bad in (["model.engine"], ["=x"], ["model..engine=x"], ["model.path.deeper=x"], ["questions.9=x"],
                ["questions=[Why?]"]):  # PyYAML reads '?' in a flow list as a key marker
        with pytest.raises(JobError, match="--set"):
            load_job(None, bad)
    data = {"a": {"b": 1}}
    assert apply_overrides(data, ["a.c.d=2"]) == {"a": {"b": 1, "c": {"d": 2}}} and data == {"a": {"b": 1}}


FACTS = {"model_id": "tiny:residual:8", "checkpoint_id": "weights-a", "num_frames": 8,
         "frame_sampling": "original"}


def _derivations(job, facts=FACTS) -> dict[str, str]:
    spec = job.spec(facts)
    return {"media": spec.media, "visual": spec.visual, **{f"{a.kind}:{a.prompt}": a.derivation for a in spec.asks}}


def test_cells_are_keyed_by_what_derives_them() -> None:
    base = load_job(None)
    cells = _derivations(base)
    same = [["model.engine=vllm"], ["model.device=auto"], ["runtime.batch_size=9"], ["model.temperature=0.3"],
            ["output.table=other"], ["name=renamed"], ["model.path=/elsewhere"]]
    for ov in same:  # execution details, sampling knobs greedy decoding ignores, the checkpoint's path (not content)
        assert _derivations(load_job(None, ov)) == cells, ov
    assert load_job(None, ["name=renamed"]).spec(FACTS).spec != base.spec(FACTS).spec  # what each job has done
    q1, q2 = base.questions
    # what changes which cells: a new question → that answer only; the caption prompt → the caption only;
    # decoding, prompt format, dtype → every generation but not the visual embedding or the media facts;
    # the checkpoint → all but the media facts; frames → everything
    added = _derivations(load_job(None, [f'questions=["{q1}", "{q2}", "Is it red?"]']))
    assert {k: v for k, v in added.items() if k != "answer:Is it red?"} == cells and "answer:Is it red?" in added
    prompt = _derivations(load_job(None, ["caption_prompt=Summarise."]))
    assert prompt.pop("caption:Summarise.") != cells["caption:Describe the video in detail."]
    assert prompt == {k: v for k, v in cells.items() if not k.startswith("caption:")}
    generations = {k for k in cells if k not in ("media", "visual")}
    for ov in (["model.dtype=bfloat16"], ["model.max_new_tokens=9"], ["model.do_sample=true"], ["prompt.preset=qa"],
               ["prompt.answer_prefix=Answer:"], ["model.decoding=original"]):
        d = _derivations(load_job(None, ov))
        assert {k for k in cells if d[k] != cells[k]} == generations, ov
    other = _derivations(base, {**FACTS, "checkpoint_id": "weights-b"})
    assert {k for k in cells if other[k] != cells[k]} == generations | {"visual"}
    frames = _derivations(base, {**FACTS, "num_frames": 4})
    assert all(frames[k] != cells[k] for k in cells)
    embedder = _derivations(load_job(None, ["embedder.model=other-model"]))  # captions carry their embeddings
    assert {k for k in cells if embedder[k] != cells[k]} == {"caption:Describe the video in detail."}
    # the schema-2 config hash (kept to migrate older indexes) still names the config
    assert base.config_hash("weights-a") != base.config_hash("weights-b")


def test_decoding_preset_and_prompt_in_jobs() -> None:
    from pipeline.jobs import parse_job

    minimal = {"name": "x", "source": {"uri": "v"}, "model": {"path": "tiny", "decoding": "original"},
               "output": {"parquet": "p"}}
    opts = parse_job(minimal).generation_options()
    assert (opts.num_beams, opts.max_new_tokens) == (5, 300)
    opts = load_job(None, ["model.decoding=original"]).generation_options()
    assert (opts.num_beams, opts.max_new_tokens) == (5, 24)  # the demo job sets max_new_tokens: it wins
    opts = load_job(None, ["prompt.preset=mvbench"]).generation_options()
    assert opts.prompt.answer_prefix == "Best option:(" and opts.repetition_penalty_for(1.5) == 1.0
    opts = load_job(None, ["prompt.preset=qa", 'prompt.system="Look.\\n"']).generation_options()  # YAML quotes
    assert opts.prompt.render("q", "unused") == "Look.\n###Human: q ###Assistant: "
    with pytest.raises(JobError, match="prompt.preset"):
        load_job(None, ["prompt.preset=vqa"])


def test_secrets_are_masked_in_dumps() -> None:
    job = load_job(None, ["output.s3={access_key_id: AKIA, secret_access_key: hunter2}"])
    assert job.output.s3.secret == "hunter2"
    assert "hunter2" not in job.model_dump_json()


@pytest.mark.parametrize("overrides, cpus, want", [
    # (decode actors, model CPUs each) after fitting
    ([], 8.0, (2, 1.0)),  # defaults fit: untouched
    ([], 2.0, (1, 1.0)),  # 2 x 1 decode + 1 model > 2: one decode actor
    (["runtime.decode_concurrency=4", "runtime.decode_cpus=0.5"], 2.0, (2, 1.0)),
    (["runtime.model_cpus=2"], 2.0, (1, 1.0)),  # even one decode actor does not fit: the model shrinks
])
def test_actor_pools_are_fitted_to_the_cluster(overrides: list[str], cpus: float, want: tuple[int, float]) -> None:
    from pipeline.runner import fit_cpu_reservations

    job = load_job(None, ["runtime.decode_concurrency=2", "runtime.decode_cpus=1", "runtime.model_cpus=1",
                          *overrides])
    fit_cpu_reservations(job, cpus)
    assert (job.runtime.decode_concurrency, job.runtime.model_cpus) == want
    rt = job.runtime
    assert rt.decode_concurrency * rt.decode_cpus + rt.model_pool_size * rt.model_cpus <= cpus + 1e-9


def test_the_world_model_gets_the_prompt_it_was_trained_with() -> None:
    from pipeline.jobs import job_warnings

    world = load_job(ROOT / "jobs" / "world.yaml")  # the example job of the shipped model sets no preset
    assert world.model.path == "world" and world.prompt.preset == "qa" and job_warnings(world) == []
    assert load_job(None, ["model.path=world"]).prompt.preset == "qa"
    assert load_job(None, ["model.path=world", "prompt.preset=qa"]).spec(FACTS) == \
        load_job(None, ["model.path=world"]).spec(FACTS)  # the demo's explicit preset: the same cells
    other = load_job(None, ["model.path=world", "prompt.preset=conversation"])
    assert other.prompt.preset == "conversation"  # the job's choice stands, with a reason to change it
    [warning] = job_warnings(other)
    assert "'qa'" in warning and "'conversation'" in warning and "poor" in warning
    others = [load_job(None, ov) for ov in ([], ["model.path=/models/x"], ["prompt.preset=mvbench"])]
    assert [j.prompt.preset for j in others] == ["conversation", "conversation", "mvbench"]  # no training preset
    assert all(job_warnings(j) == [] for j in others)


def test_the_job_fields_name_the_shipped_models() -> None:
    from pipeline.jobs import ModelConfig, PromptConfig

    path = ModelConfig.model_fields["path"].description
    assert "'world'" in path and "'tiny'" in path and "RANDOM" in path
    assert "world" in PromptConfig.model_fields["preset"].description
    demo = (ROOT / "jobs" / "demo.yaml").read_text()
    assert "stllm-index demo" in demo and "jobs/world.yaml" in demo  # where the meaningful model is
