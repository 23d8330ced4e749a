"""Per-request perf metrics and the server's Prometheus metrics."""
