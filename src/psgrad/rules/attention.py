"""Rules for the attention layer family (registered into DEFAULT on import)."""
