"""Where videos come from: sources (local folders, s3:// prefixes), fetching their bytes, and the listing that
decides what a run has to do. Where results go is `pipeline.store`."""
