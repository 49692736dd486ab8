"""Running a model over token data: the forward passes that calibration, methods and evaluation
share (below the methods, so a method may measure the model it is compressing)."""
