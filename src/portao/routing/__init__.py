"""Sans-I/O routing: where messages go and which calls still wait for an answer."""
