"""Training data: the example schema, loading and validation, collators and batch samplers."""
