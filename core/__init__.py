"""Shared library code: decoding, labels, datasets, checkpoints, metrics, configs.

`core` imports nothing from `models`, `data_prep` or the entry points.
"""
