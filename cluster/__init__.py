"""Cluster bring-up: Serve config YAML, Ray start scripts, Prometheus and Grafana provisioning."""
