"""Quantization: the method ablation on the tiny models, the diagnoses, llama.cpp beside ours, the
ranking, quantize time."""
