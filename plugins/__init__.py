"""threadsync plugins: built-in providers and integrations."""
