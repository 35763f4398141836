"""Measuring generations: metrics and their names, statistics, evaluation, the served state."""
