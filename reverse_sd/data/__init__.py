"""Data: TFDS builders, the input pipeline and the regression targets."""
