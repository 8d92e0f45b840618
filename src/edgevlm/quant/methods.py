"""The quantization methods `edgevlm quantize` offers: what the stage does differently for each
(the table `quantize` reads instead of comparing method names) and each method's own knobs.

`QuantConfig` (quant/primitives.py) holds what every method shares and nests one frozen config
per method that has knobs of its own: `GptqConfig` (GPTQ, Frantar et al. 2023) and `QvlmConfig`
(Q-VLM, Wang et al. 2024); RTN has none. They live here, beside the table, and not in gptq.py
and qvlm.py: those import QuantConfig, which nests these, so a config beside its method would
close an import circle; and this file imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgevlm.errors import UserError

PARTITIONS = ("entropy", "uniform")


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


def config_error(name: str, value, fix: str) -> UserError:
    """A bad config field and how to fix it. Nested knobs are named QuantConfig.<field> too, as
    before they were nested: field names are unique across the configs, and the CLI's flags
    (--max-block, --act-order) set them without saying which config holds them."""
    return UserError(f"QuantConfig.{name}={value!r} is not valid; {fix}")


def check_tuple(name: str, value) -> None:
    """Frozen configs hold tuples (a list would make them unhashable and unequal to the same
    config read back); JSON's lists become tuples in QuantConfig.from_dict."""
    if not isinstance(value, tuple):
        raise config_error(name, value, "give a tuple (QuantConfig.from_dict reads JSON lists)")


def tuples(d: dict) -> dict:
    """`d` with its lists (a config read from JSON) as tuples, nested ones too."""
    def fix(v):
        return tuple(fix(x) for x in v) if isinstance(v, list) else v
    return {k: fix(v) for k, v in d.items()}


@dataclass(frozen=True)
class GptqConfig:
    """GPTQ's own knobs; Q-VLM's per-layer pass and its GPTQ guard run GPTQ with them too."""

    percdamp: float = 0.01  # damping, as a fraction of the mean Hessian diagonal
    act_order: bool = False  # quantize columns by decreasing Hessian diagonal
    # columns updated lazily per block; a multiple of the group size, which QuantConfig checks
    # (it holds the group size)
    gptq_block: int = 128

    def __post_init__(self):
        if not 0 < self.percdamp < 1:
            raise config_error("percdamp", self.percdamp, "use a small fraction such as 0.01")
        if self.gptq_block < 1:
            raise config_error("gptq_block", self.gptq_block,
                               "use a multiple of the group size, e.g. 128")


@dataclass(frozen=True)
class QvlmConfig:
    """Q-VLM's own knobs (quant/qvlm.py): its blocks, its clip search, its vision tuning."""

    max_block: int = 4  # at most this many decoder layers searched jointly
    partition: str = "entropy"  # cut blocks at low entropy, or equal sizes (same count)
    # tune projector/norms to lower visual-token entropy. Off by default: held-out data showed
    # no gain and one 10x KL loss (docs/results/quant-smollm2.md; issue 15)
    vision_opt: bool = False
    vision_opt_steps: int = 20
    clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # clip candidates α
    clip_strengths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # β candidates

    def __post_init__(self):
        if self.max_block < 1:
            raise config_error("max_block", self.max_block,
                               "a block holds at least one decoder layer")
        if self.partition not in PARTITIONS:
            raise config_error("partition", self.partition, f"use one of {', '.join(PARTITIONS)}")
        check_tuple("clip_grid", self.clip_grid)
        if not self.clip_grid or any(not 0 < c <= 1 for c in self.clip_grid):
            raise config_error("clip_grid", self.clip_grid, "clip ratios must lie in (0, 1]")
        check_tuple("clip_strengths", self.clip_strengths)
        if not self.clip_strengths or any(not 0 <= b <= 1 for b in self.clip_strengths):
            raise config_error("clip_strengths", self.clip_strengths,
                               "strengths must lie in [0, 1]")
