"""Loomwatch: the ``loomwatch`` command line, the one place that wires training and serving."""
