"""Training across processes: synchronous all-reduce now; the parameter server and GBA next."""
