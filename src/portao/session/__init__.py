"""Sans-I/O session logic: token checks, rate limits and the connection lifecycle."""
