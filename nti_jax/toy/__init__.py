"""Toy world (coloured shapes) and toy-model assets for nti-jax."""
