"""The index on disk: results as cells keyed by what derived them (`cells`), the current view — one row per
video — built from them (`view`), both committed exactly once to Parquet and LanceDB (`commit`), plus the error
ledger, run manifests, the job registry, search indexes and the lock. `writer.IndexWriter` is what a run uses;
docs/architecture.md draws the picture."""
