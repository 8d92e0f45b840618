"""The quantization methods `edgevlm quantize` offers, and what the stage does differently for
each: the table `quantize` reads instead of comparing method names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    needs_calib: bool  # chooses its integers against calibration activations
    joint_blocks: bool  # searches blocks of layers cut by activation entropy (Q-VLM), each
    # block against its float output; else one Linear at a time, layer by layer
    holds_out: bool  # keeps calibration samples back to judge its choices
    gptq_guard: bool  # weighed against GPTQ on the held-out samples, falling back to it

    @property
    def unit(self) -> str:
        """What its progress counts."""
        return "blocks" if self.joint_blocks else "layers"


METHODS = {m.name: m for m in (
    Method("rtn", needs_calib=False, joint_blocks=False, holds_out=False, gptq_guard=False),
    Method("gptq", needs_calib=True, joint_blocks=False, holds_out=False, gptq_guard=False),
    Method("qvlm", needs_calib=True, joint_blocks=True, holds_out=True, gptq_guard=True),
)}
