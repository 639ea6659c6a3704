"""Rules for the conv layer family (registered into DEFAULT on import)."""
