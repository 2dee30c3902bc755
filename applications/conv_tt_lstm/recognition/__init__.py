"""Early activity recognition."""
