"""Server side: the tail server (the relay role included), its plan registry and decoder sessions."""
