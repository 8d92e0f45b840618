"""Distillation: the LLaVA-KD and LLaVA-MoD ablations, the MoE student through quantize and
export, the teacher recipe."""
