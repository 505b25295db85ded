"""What app replicas share: local state, or Redis state with its records and Lua scripts."""
