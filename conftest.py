# Root conftest: shared fixture plugins (the model fixtures live in tests/tiny_fixtures.py).
pytest_plugins = ["tests.tiny_fixtures"]
