"""Model loading, family adapters and module surgery."""
