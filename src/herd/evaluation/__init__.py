"""Evaluations that stages, callbacks and ``python -m herd.evaluate`` share."""
