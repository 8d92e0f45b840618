"""LLaVA-KD distillation: `distill(teacher_dir, student_dir, data, out, DistillConfig(...))`."""

from edgevlm.distill.losses import LossWeights
from edgevlm.distill.stages import DistillConfig, DistillResult, StageResult, distill

__all__ = ["DistillConfig", "DistillResult", "LossWeights", "StageResult", "distill"]
