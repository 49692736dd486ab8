"""Pure tensor functions: whitening, shared truncated factorisations, rank rules.

No model and no config in here: every function takes tensors and numbers and is tested alone
against an exact oracle (docs/architecture.md §5.1).
"""
