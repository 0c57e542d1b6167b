"""Benchmarks: how fast threadsync is against a real Dovecot and aiosmtpd, measured
side by side with the least protocol work that gives the same result. Run
``python benchmarks/run.py`` (see ``benchmarks/README.md``); nothing here is
asserted by the test suite."""
