"""Text side: the MiniLM target encoder."""
