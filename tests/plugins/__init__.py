"""Tests of the providers and integrations in ``plugins/``."""
