"""The HTML report of a run folder (`python -m nti_jax.report OUT`)."""
