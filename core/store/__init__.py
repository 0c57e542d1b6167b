"""Persistence: the SQLAlchemy models (:mod:`.models`), the one :class:`Store`
(:mod:`.database`), Alembic migrations (``migrations/``) and the vault that
encrypts secrets at rest (:mod:`.vault`)."""
