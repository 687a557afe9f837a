"""Search at catalog scale, the way `stllm-index search` and `similar` run it, on two synthetic archives.

Each archive: a table shaped like the index's `videos` view (the columns a hit shows, answers, both embeddings)
of 1M rows (`--quick`: 100k), indexed as the writer indexes it (`maintain_indexes`: full text, scalar, IVF_PQ
on both vector columns). Its embeddings come from a mixture of 2000 clusters around random unit centres, noise of
norm σ, normalised: the caption embedding (384-d, the text embedder's width) and the visual embedding (1408-d,
EVA ViT-g's width), both from the row's cluster; its caption holds three of its cluster's topic words and two
common ones. Two archives: `clustered` (σ 0.35) and `wide` (σ 1.0, the same generator).

Queries are drawn fresh from the same distribution (a new cluster draw and new noise; never an indexed row) and
ask for full rows: `Catalog.search(mode="vector")` as the CLI runs it (the hit's columns, scores) for captions,
and `Catalog.near_visual`, `similar`'s query (the same model's embeddings, copies left out), for the visual one.
- `search_recall_at_10_*`: the share of the exact top 10 (brute force over the stored vectors) found;
- `search_p50_ms_*`: warm — the table held open (as `serve` and the Python API hold it), after one query; the
  median over 3 passes of each pass's p50;
- `search_cold_ms_*`: the first query after opening the table in a fresh process (as each CLI call is; the
  OS page cache stays warm): the median over the samples, the opening itself in the details;
- `hybrid_recall_at_10_*` / `hybrid_p50_ms_*`: `query_table` with text and vector as the product runs it (the
  CLI's default mode), with a filter, against the same query with the vector index bypassed (exact vectors,
  same full-text side, same fusion).
The index build and an incremental update (+1% rows) are timed in the details.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Result, from_reps, spread

os.environ.setdefault("LANCE_LOG", "error")  # LanceDB warns on every hybrid query that selects columns (0.40)

DIMS = {"caption": 384, "visual": 1408}
COLUMNS = {"caption": "caption_embedding", "visual": "visual_embedding"}
CLUSTERS = 2000
MIXTURES = {"clustered": 0.35, "wide": 1.0}
VOCABULARY = 6000
COMMON_WORDS = ["video", "scene", "person", "outdoor", "indoor", "camera", "light", "people", "street", "room"]
VISUAL_MODEL = "bench-vit"
HYBRID_FILTER = "duration_s > 60"
K = 10


class Archive:
    """The generator: cluster centres per embedding and topic words per cluster; rows and queries from it."""

    def __init__(self, sigma: float, seed: int):
        self.sigma = sigma
        rng = np.random.default_rng(seed)
        self.centres = {}
        for kind, dim in DIMS.items():
            c = rng.standard_normal((CLUSTERS, dim)).astype(np.float32)
            self.centres[kind] = c / np.linalg.norm(c, axis=1, keepdims=True)
        self.topics = rng.integers(0, VOCABULARY, (CLUSTERS, 3))

    def vectors(self, kind: str, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        dim = DIMS[kind]
        v = self.centres[kind][labels] + rng.standard_normal((len(labels), dim), np.float32) * (self.sigma
                                                                                              / np.sqrt(dim))
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    def captions(self, labels: np.ndarray, rng: np.random.Generator) -> list[str]:
        common = rng.integers(0, len(COMMON_WORDS), (len(labels), 2))
        return [f"a {COMMON_WORDS[a]} with w{t[0]} w{t[1]} and w{t[2]} {COMMON_WORDS[b]}"
                for t, (a, b) in zip(self.topics[labels], common, strict=True)]

    def query_text(self, label: int) -> str:
        t = self.topics[label]
        return f"w{t[0]} w{t[2]}"


def _batch(archive: Archive, start: int, n: int, rng: np.random.Generator) -> tuple[Any, dict[str, np.ndarray]]:
    import pyarrow as pa

    from schemas import ANSWER_TYPE

    labels = rng.integers(0, CLUSTERS, n)
    vecs = {kind: archive.vectors(kind, labels, rng) for kind in DIMS}
    captions = archive.captions(labels, rng)
    ids = [f"v{start + i:08d}" for i in range(n)]
    # two answers per row, as a job with two questions
    questions = pa.array(["Where is it?", "What happens?"] * n)
    answers_flat = pa.array([f"w{t}" for t in rng.integers(0, VOCABULARY, 2 * n)])
    models, runs = pa.array(["m"] * (2 * n)), pa.array(["r"] * (2 * n))
    answers = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)),
                                       pa.StructArray.from_arrays([questions, answers_flat, models, runs],
                                                                  fields=list(ANSWER_TYPE)))
    answers_text = [f"Where is it? {a} What happens? {b}" for a, b in
                    zip(answers_flat.to_pylist()[::2], answers_flat.to_pylist()[1::2], strict=True)]
    now = np.datetime64("2026-12-01T00:00:00", "us") + rng.integers(0, 10**12, n).astype("timedelta64[us]")
    table = pa.table({
        "video_id": ids, "content_id": [f"c{start + i:08d}" for i in range(n)],
        "uri": [f"s3://archive/videos/{start + i:08d}.mp4" for i in range(n)],
        "size": rng.integers(10**6, 10**9, n), "copy_of": pa.nulls(n, pa.string()),
        "caption": captions, "caption_model": ["bench-model"] * n, "answers": answers, "answers_text": answers_text,
        "caption_embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs["caption"].ravel()), DIMS["caption"]),
        "visual_embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs["visual"].ravel()), DIMS["visual"]),
        "visual_model": [VISUAL_MODEL] * n, "stale": np.zeros(n, bool),
        "duration_s": rng.uniform(1, 600, n), "codec": rng.choice(["h264", "hevc", "vp9"], n),
        "width": np.full(n, 1280, np.int32), "height": np.full(n, 720, np.int32),
        "indexed_at": pa.array(now, pa.timestamp("us", tz="UTC")),
    })
    return table, vecs


def _build(root: Path, archive: Archive, n: int, seed: int) -> dict[str, Any]:
    """The table (LanceDB) and its vectors (memory-mapped .npy files, for the exact reference)."""
    from pipeline.store.lance import connect_lance
    from pipeline.store.search_indexes import maintain_indexes

    rng = np.random.default_rng(seed)
    extra_n = n // 100  # a run's new rows (+1%), folded in by the next maintenance
    mm = {kind: np.lib.format.open_memmap(root / f"{kind}.npy", "w+", np.float32, (n + extra_n, dim))
          for kind, dim in DIMS.items()}
    db = connect_lance(str(root / "lance"))
    table = None
    step = 50_000
    for start in range(0, n, step):
        batch, vecs = _batch(archive, start, min(step, n - start), rng)
        for kind in DIMS:
            mm[kind][start:start + len(vecs[kind])] = vecs[kind]
        if table is None:
            table = db.create_table("videos", batch)
        else:
            table.add(batch)
    t0 = time.perf_counter()
    maintain_indexes(table, fts_columns=("caption", "answers_text"), scalar_columns=("video_id", "content_id"),
                     vector_columns=tuple(COLUMNS.values()))
    build_s = time.perf_counter() - t0
    extra, vecs = _batch(archive, n, extra_n, rng)
    for kind in DIMS:
        mm[kind][n:] = vecs[kind]
        mm[kind].flush()
    table.add(extra)
    t0 = time.perf_counter()
    maintain_indexes(table, fts_columns=("caption", "answers_text"), scalar_columns=("video_id", "content_id"),
                     vector_columns=tuple(COLUMNS.values()))
    update_s = time.perf_counter() - t0
    stats = {kind: table.index_stats(f"{col}_idx") for kind, col in COLUMNS.items()}
    return {"build_s": round(build_s, 1), "update_1pct_s": round(update_s, 1), "rows": table.count_rows(),
            "index": {k: getattr(s, "index_type", None) for k, s in stats.items()}}


def _exact(root: Path, kind: str, queries: np.ndarray, n: int) -> np.ndarray:
    """Top-K row numbers by cosine (the vectors are unit length: the dot product), brute force over all n rows."""
    data = np.load(root / f"{kind}.npy", mmap_mode="r")
    best = np.full((len(queries), K), -np.inf, np.float32)
    best_i = np.zeros((len(queries), K), np.int64)
    for start in range(0, n, 100_000):
        chunk = np.asarray(data[start:start + 100_000])
        scores = queries @ chunk.T
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        cand = np.concatenate([best, np.take_along_axis(scores, top, 1)], 1)
        cand_i = np.concatenate([best_i, top + start], 1)
        order = np.argsort(-cand, axis=1)[:, :K]
        best, best_i = np.take_along_axis(cand, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_i


def _query(catalog: Any, kind: str, vector: np.ndarray) -> list[dict[str, Any]]:
    """What the CLI runs: `search --mode vector` (its text embedded beforehand) or `similar`'s query (the same
    model's embeddings, a content left out: here one the archive does not hold)."""
    if kind == "caption":
        return catalog.search("", mode="vector", vector=vector.tolist(), k=K)
    return catalog.near_visual(vector.tolist(), VISUAL_MODEL, k=K, leave_out="c-none")


def _hybrid(table: Any, text: str, vector: np.ndarray, exact: bool) -> list[dict[str, Any]]:
    """The product's hybrid query (`query_table` with text and vector); `exact`: the same query with the vector
    index bypassed — mirrors `query_table`'s hybrid branch."""
    from lancedb.query import MultiMatchQuery
    from lancedb.rerankers import RRFReranker

    from pipeline.catalog.query import HIT_COLUMNS
    from pipeline.catalog.search import query_table

    columns = [c for c in HIT_COLUMNS if c in table.schema.names]
    if not exact:
        return query_table(table, text, vector.tolist(), K, where=HYBRID_FILTER, columns=columns)
    q = (table.search(query_type="hybrid", vector_column_name="caption_embedding").vector(vector.tolist())
         .text(MultiMatchQuery(text, ["caption", "answers_text"])).distance_type("cosine").bypass_vector_index()
         .rerank(RRFReranker()))
    return q.where(HYBRID_FILTER, prefilter=True).select(columns).limit(K).to_list()


_COLD = """
import json, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
from benchmarks.search import _query
from pipeline.catalog.query import Catalog
q = np.load({queries!r})[{i}]
t0 = time.perf_counter()
catalog = Catalog({uri!r})
t1 = time.perf_counter()
rows = _query(catalog, {kind!r}, q)
t2 = time.perf_counter()
assert len(rows) == {k}
print(json.dumps({{"open_ms": (t1 - t0) * 1000, "first_ms": (t2 - t1) * 1000}}))
"""


def _cold(uri: str, kind: str, queries_file: Path, i: int) -> dict[str, float]:
    repo = str(Path(__file__).resolve().parents[1])
    code = _COLD.format(repo=repo, queries=str(queries_file), i=i, uri=uri, kind=kind, k=K)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ids(rows: list[dict[str, Any]]) -> set[int]:
    return {int(r["video_id"][1:]) for r in rows}


def bench_search(quick: bool = False, n: int | None = None, queries: int | None = None, passes: int = 3,
                 cold_samples: int | None = None, seed: int = 0) -> list[Result]:
    from pipeline.catalog.query import Catalog

    n = n or (100_000 if quick else 1_000_000)
    queries = queries or (30 if quick else 100)
    cold_samples = cold_samples or (3 if quick else 7)
    tag = f"{n // 1_000_000}m" if n >= 1_000_000 else f"{n // 1000}k"
    out: list[Result] = []
    for m, (mixture, sigma) in enumerate(MIXTURES.items()):
        archive = Archive(sigma, seed + 17 * m)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            t0 = time.perf_counter()
            built = _build(root, archive, n, seed + 17 * m + 1)
            built["made_s"] = round(time.perf_counter() - t0, 1)
            uri = str(root / "lance")
            qrng = np.random.default_rng(10_000 + seed + m)  # fresh draws: never an indexed row
            labels = qrng.integers(0, CLUSTERS, queries)
            catalog = Catalog(uri)
            for kind in DIMS:
                qs = archive.vectors(kind, labels, qrng)
                qfile = root / f"queries-{kind}.npy"
                np.save(qfile, qs)
                exact = _exact(root, kind, qs, built["rows"])
                _query(catalog, kind, qs[0])  # warm: the index loaded
                pass_p50, lat_all, hits = [], [], 0
                for p in range(passes):
                    lat = []
                    for q, truth in zip(qs, exact, strict=True):
                        t0 = time.perf_counter()
                        rows = _query(catalog, kind, q)
                        lat.append((time.perf_counter() - t0) * 1000)
                        if p == 0:
                            hits += len(_ids(rows) & set(truth.tolist()))
                    pass_p50.append(float(np.median(lat)))
                    lat_all += lat
                cold = [_cold(uri, kind, qfile, i) for i in range(cold_samples)]
                name = f"{kind}_{mixture}_{tag}"
                common = {"rows": built["rows"], "dim": DIMS[kind], "sigma": sigma, "queries": queries,
                          "query": "fresh draws from the archive's distribution", "k": K}
                out += [
                    Result(f"search_recall_at_10_{name}", hits / (K * queries), ">= 0.95", detail={
                        **common, "reference": "exact top 10 by cosine, brute force"}),
                    from_reps(f"search_p50_ms_{name}", pass_p50, "<= 20", unit="ms", detail={
                        **common, "p90_ms": round(float(np.percentile(lat_all, 90)), 1), "passes": passes,
                        "table": "held open", **({"build": built} if kind == "caption" else {})}),
                    from_reps(f"search_cold_ms_{name}", [c["first_ms"] for c in cold], "<= 250", unit="ms", detail={
                        **common, "samples": cold_samples, "open_ms": spread([c["open_ms"] for c in cold], 1),
                        "cold": "first query in a fresh process after opening the table; OS page cache warm"}),
                ]
            # hybrid: the product's settings vs the same query with exact vectors
            qs = archive.vectors("caption", labels, qrng)
            texts = [archive.query_text(int(c)) for c in labels]
            table = catalog.table
            _hybrid(table, texts[0], qs[0], exact=False)
            hits, lat_passes = 0, []
            for p in range(passes):
                lat = []
                for q, text in zip(qs, texts, strict=True):
                    t0 = time.perf_counter()
                    got = _hybrid(table, text, q, exact=False)
                    lat.append((time.perf_counter() - t0) * 1000)
                    if p == 0:
                        hits += len(_ids(got) & _ids(_hybrid(table, text, q, exact=True)))
                lat_passes.append(float(np.median(lat)))
            common = {"rows": built["rows"], "filter": HYBRID_FILTER, "fts": "two of the cluster's topic words",
                      "queries": queries, "fusion": "RRF (LanceDB)"}
            out += [
                Result(f"hybrid_recall_at_10_{mixture}_{tag}", hits / (K * queries), ">= 0.9", detail={
                    **common, "reference": "the same hybrid query with the vector index bypassed"}),
                from_reps(f"hybrid_p50_ms_{mixture}_{tag}", lat_passes, "info", unit="ms", detail=common),
            ]
    return out

