"""Catalogue family linear-recurrent: linear attention, recurrences, memories and hybrids, one entry per module."""
