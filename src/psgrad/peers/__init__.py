"""Other libraries' implementations, wrapped faithfully so that psgrad can be compared with them: the engines,
the bench and ``psgrad train`` use these and nothing else of theirs. Each is an optional dependency."""
