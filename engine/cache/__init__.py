"""Caches computed before training: VAE latents and text-encoder outputs, each entry with a key checked on reuse."""
