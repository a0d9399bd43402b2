"""Evaluating a trained model: perplexity and bits per byte (perplexity.py), multiple choice (multiple_choice.py).

Submodules are imported on use, so a command pulls in only what it needs.
"""
