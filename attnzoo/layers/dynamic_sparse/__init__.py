"""Catalogue family dynamic-sparse: content-routed or learned sparsity, every entry on the routed-attention op."""
