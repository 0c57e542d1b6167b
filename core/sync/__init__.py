"""Sync: reading new mail of a connection and storing what belongs to synced
threads (:mod:`.ingest`), and the daemon that runs it for every live connection
(:mod:`.daemon`)."""
