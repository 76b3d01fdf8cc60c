"""Deployment tooling for an outcomebench network (not part of the installed package).

Run from a checkout: ``python -m deploy.pki --help``.
"""
