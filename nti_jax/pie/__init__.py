"""PIE-Bench: its layout (mapping file, masks, editing types) and its metrics."""
