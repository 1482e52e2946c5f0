"""spatiotemporal: space-time attention over video tokens (catalogue section 8)."""
