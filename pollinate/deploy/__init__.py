"""Deployment: the certificates and keys of a federation (``certs``), made with ``cryptography``."""
