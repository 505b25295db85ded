"""Choosing a route: the policies, ``prefix_aware`` and its index, server load read from vLLM's ``/metrics``."""
