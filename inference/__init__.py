"""Pixels to result to report: preprocessing, models, the per-study pipeline and the SR builder.

Filled by the model-lifecycle and inference issues; the node core does not import it yet.
"""
