"""Plain, readable PyTorch for every op: the definition of correct that every kernel is tested against."""
