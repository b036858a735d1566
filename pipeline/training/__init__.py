"""Training loops that run outside torchrun (the FID feature extractor)."""
