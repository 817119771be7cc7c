"""Checkpoint converters: table-driven key maps, every key accounted for."""
