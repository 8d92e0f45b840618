"""The decoder builder: onnxruntime contrib-op graphs written from the weights, one file per op
group (norms, attention, linear, MLP/MoE, the layer loop in model.py), as onnxruntime-genai's
builder writes them (DESIGN.md, "The decoder builder")."""
