"""Rules for the norm layer family (registered into DEFAULT on import)."""
