"""Model loading and prompt rendering."""
