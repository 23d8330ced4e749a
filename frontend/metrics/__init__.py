"""Per-request perf metrics, the server's Prometheus metrics, and trace spans."""
