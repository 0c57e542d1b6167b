"""threadsync's built-in plugins: the mailbox providers (``imap_smtp``, ``outlook``)
and the integrations (``http_api``, ``localmail``), loaded through the same
``threadsync`` entry-point group as third-party plugins."""
