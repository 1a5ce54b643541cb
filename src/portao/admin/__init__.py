"""The admin HTTP listener: Prometheus metrics, health and readiness, the chat page."""
