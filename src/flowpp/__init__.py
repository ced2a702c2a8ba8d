"""Flow++ in PyTorch."""
