"""What people do with an index: search it."""
