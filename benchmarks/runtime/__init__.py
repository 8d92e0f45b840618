"""Runtime: decode, prefill and TTFT against transformers, onnxruntime-genai and llama.cpp."""
