"""The whole reverse-SD loop in miniature; see `python -m reverse_sd.loop`."""
