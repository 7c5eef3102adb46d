"""Experiments that combine extraction and probes (``reasoning_ablation``)."""
