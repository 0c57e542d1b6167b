"""The kernel (``threadsync.core``): every rule decision, the store, the sync loop,
the outbox, MIME and what the host sees. Plugins and the CLI call into it; it
never imports them.

Rooms, one concern each:

* :mod:`~threadsync.core.rules`: every rule as a pure decision (states, routing,
  limits, backoff); :mod:`~threadsync.core.errors`: the one error tree;
  :mod:`~threadsync.core.config`: typed settings.
* :mod:`~threadsync.core.kernel` (shared context, applying state changes) and
  :mod:`~threadsync.core.api` (the Python API, :class:`Threadsync`).
* The plugin seams: :mod:`~threadsync.core.provider`,
  :mod:`~threadsync.core.hookspecs`, :mod:`~threadsync.core.registry`.
* :mod:`~threadsync.core.accounts`: Labs, connect, update-email, disconnect, sign-ins.
* :mod:`~threadsync.core.sync`: reading mailboxes (ingest) and the daemon.
* :mod:`~threadsync.core.outbox`: composing CRM mail and delivering it exactly once.
* :mod:`~threadsync.core.mime`: building and parsing messages.
* :mod:`~threadsync.core.store`: models, the database, migrations, the vault.
* :mod:`~threadsync.core.host`: events, the webhook queue, API keys and read models.
* :mod:`~threadsync.core.testing`: the provider contract kit (``threadsync.testing``).
"""
