"""Sync: reading new mail of a connection and storing what belongs to synced
threads (:mod:`.ingest`), the daemon that runs it for every live connection
(:mod:`.daemon`), and the leases by which several daemons share the connections
(:mod:`.workers`)."""
