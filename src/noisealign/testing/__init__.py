"""Tiny components built from configs, offline, for tests and examples.

Nothing here downloads anything: tokenizers are generated, weights are random and seeded.
"""
