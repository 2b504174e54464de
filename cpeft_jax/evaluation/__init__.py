"""Evaluation of trained workdirs: caption perplexity per split (perplexity)."""
