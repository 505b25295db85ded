"""What the router reports: per-route statistics, the Prometheus collector, OpenTelemetry spans."""
