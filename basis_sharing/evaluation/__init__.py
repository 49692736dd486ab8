"""Perplexity, parameter accounting (and later zero-shot accuracy and throughput)."""
