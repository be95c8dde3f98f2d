"""Tiny, random-init, no-download versions of the models users train (the model zoo).

Each module builds one architecture; nothing here downloads data or weights.
"""
