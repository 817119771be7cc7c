"""The op layer's CPU part: XLA:CPU FFI kernels and process tuning."""
