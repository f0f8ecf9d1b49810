"""Deployment files (image, compose, Prometheus, Grafana, Kubernetes) and their live check, ``deploy.check``."""
