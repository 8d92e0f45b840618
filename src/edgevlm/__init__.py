"""edgevlm: distill, quantize, export and run vision-language models on edge devices."""

__version__ = "0.1.0"
