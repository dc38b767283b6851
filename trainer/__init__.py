"""Training: the loop every layout reuses (DESIGN.md principle 5)."""
