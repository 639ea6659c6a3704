"""Rules for the recurrent layer family (registered into DEFAULT on import)."""
