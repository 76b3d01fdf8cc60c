"""Flower's minimal query app (a benchmark baseline): see server_app and client_app."""
