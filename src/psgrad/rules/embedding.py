"""Rules for the embedding layer family (registered into DEFAULT on import)."""
