"""Catalogue family local-sparse: local, windowed, grid, graph and hierarchical attention, one entry per module."""
