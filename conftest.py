"""Fixture modules shared by the whole test suite (server fixtures live in
tests/conftest.py)."""

pytest_plugins = ["tests.dbfixtures", "tests.kernelfixtures"]
