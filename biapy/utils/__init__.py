"""Small helpers shared across the package: atomic files, charts, train logs, TensorBoard."""
