"""Benchmarks: tempest beside the in-process floor and peer job systems.

``bash bench/run`` runs them (see bench/README.md); ``python -m bench.smoke``
checks, in a few seconds and without the peers installed, that every tempest
contender still runs.
"""
