"""One endpoint: a ``Route`` (its clients, timeouts, statistics), Ollama routes, the breaker and the prober."""
