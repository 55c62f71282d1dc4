"""Training across processes: synchronous all-reduce, the parameter-server phases (async, GBA) and the switches between them, stragglers, the launcher."""
