"""Text corpora (local mirror first, hub second), tokenization and the calibration sampler."""
