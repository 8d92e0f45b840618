"""Post-training quantization: Q-VLM, GPTQ and RTN into compressed-tensors checkpoints."""

from edgevlm.quant.api import QuantResult, quantize
from edgevlm.quant.methods import GptqConfig, QvlmConfig
from edgevlm.quant.primitives import QuantConfig

__all__ = ["GptqConfig", "QuantConfig", "QuantResult", "QvlmConfig", "quantize"]
