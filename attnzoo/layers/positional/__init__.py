"""Catalogue family positional: position encodings and position-aware mixers, one entry per module."""
