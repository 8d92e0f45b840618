"""Export: device readiness, export memory, int8 weight signedness, trained parity, visual
tokens."""
