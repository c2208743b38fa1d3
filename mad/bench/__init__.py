"""Benchmarks: figures and ratios measured side by side (`mad bench ...`); machine facts from mad.runtime."""
