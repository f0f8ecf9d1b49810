"""Tests of the deployment files (deploy/, Dockerfile, docker-compose.yml) and of their live check."""
