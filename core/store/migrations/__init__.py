"""Alembic migrations of the store, run by :meth:`threadsync.core.store.database.Store.upgrade`;
``env.py`` hands them the engine, ``versions/`` holds one file per schema change."""
