"""The embedded ``stdlib:`` data sets, built offline from the running Python's standard library."""
