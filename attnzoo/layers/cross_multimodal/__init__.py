"""cross-multimodal: cross-attention and multimodal entries (catalogue section 7)."""
