"""reverse_sd: predict the prompt embedding of a Stable Diffusion image."""
