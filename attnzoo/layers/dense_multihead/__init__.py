"""Catalogue family dense-multihead: dense multi-head attention and its variants, one entry per module."""
