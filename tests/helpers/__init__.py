"""Helpers shared by the tests (on the pytest path: ``from helpers.training import ...``)."""
