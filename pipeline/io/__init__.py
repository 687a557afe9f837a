"""Where videos come from and where results go: sources (listing, fetching), sinks (Parquet, LanceDB, run
manifests) and the writers one run owns."""
