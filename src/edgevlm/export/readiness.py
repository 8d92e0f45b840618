"""How much of a graph the phone execution providers would take, by onnxruntime's own checker.

`python -m onnxruntime.tools.check_onnx_model_mobile_usability` optimizes a graph at the basic
level (what ORT Mobile and the ORT-format conversion do), infers shapes, and replays ORT's
partitioning over the ops each provider lists as supported (NNAPI, CoreML NeuralNetwork, CoreML
MLProgram), counting a node as taken only if its op is listed and its inputs have fixed shapes.
This module calls the same functions (`onnxruntime.tools.mobile_helpers.usability_checker`) and
returns the figures as data instead of log lines: per provider, the share of nodes taken, the
number of partitions, and the ops that kept nodes out, so a target that is missed names its op.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# Provider -> the supported-ops table onnxruntime ships beside its checker.
EPS = {"nnapi": "nnapi_supported_ops.md",
       "coreml_nn": "coreml_supported_neuralnetwork_ops.md",
       "coreml_mlprogram": "coreml_supported_mlprogram_ops.md"}
EP_TITLES = {"nnapi": "NNAPI", "coreml_nn": "CoreML NeuralNetwork",
             "coreml_mlprogram": "CoreML MLProgram"}
COREML_MAX_RANK = 5  # the checker's limit for both CoreML kinds

# The targets: (minimum share of nodes, maximum partitions) per component.
TARGETS = {"vision_encoder": (0.95, 1), "decoder_model_merged": (0.80, 4)}


@dataclass(frozen=True)
class EpReadiness:
    nodes: int
    supported_nodes: int
    partitions: int
    unsupported_ops: tuple[str, ...]  # ops not in the provider's table, e.g. "ai.onnx:Erf"
    dynamic_shape_nodes: int  # nodes left out only because an input shape is not fixed
    rank_nodes: int  # nodes left out because an input has more dims than the provider takes

    @property
    def share(self) -> float:
        return self.supported_nodes / self.nodes if self.nodes else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "share": round(self.share, 4)}


def blockers(ep: EpReadiness) -> list[str]:
    """What keeps nodes off the provider, in words (empty when nothing does)."""
    out = [f"op {op}" for op in ep.unsupported_ops]
    if ep.dynamic_shape_nodes:
        out.append(f"{ep.dynamic_shape_nodes} node(s) with a dynamic input shape")
    if ep.rank_nodes:
        out.append(f"{ep.rank_nodes} node(s) with inputs of rank > {COREML_MAX_RANK}")
    return out


def check_graph(path: str | Path) -> dict[str, EpReadiness]:
    """The checker's figures for one graph (with its external data, if any), per provider."""
    import onnx
    from onnxruntime.tools import onnx_model_utils as omu
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / path.name
        omu.optimize_model(path, optimized, use_external_initializers=True)
        # Shape inference without the weights: shapes of initializers come from their dims.
        model = onnx.load(str(optimized), load_external_data=False)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    # onnxruntime's helpers log through the root logger's default handler; keep them quiet.
    logging.getLogger("usability_checker").setLevel(logging.ERROR)
    out = {}
    for ep, table in EPS.items():
        config = Path(uc.__file__).parent / table
        ops = uc._SupportedOpsChecker(config)  # the checker's own reader of the table
        info = uc.check_partitioning(model.graph, ops, require_fixed_input_sizes=True,
                                     max_rank=999 if ep == "nnapi" else COREML_MAX_RANK)
        out[ep] = EpReadiness(info.num_nodes, info.num_supported_nodes, info.num_partitions,
                              tuple(sorted(info.unsupported_ops)),
                              info.nodes_unsupported_due_to_dynamic_input,
                              info.num_unsupported_nodes_due_to_rank)
    return out


@dataclass(frozen=True)
class Readiness:
    """Per component and provider; `misses` names each target not met and what blocks it."""

    components: dict[str, dict[str, EpReadiness]]
    misses: list[str]

    def to_dict(self) -> dict:
        return {"tool": "onnxruntime.tools.check_onnx_model_mobile_usability (basic-level "
                        "optimization, fixed input sizes required)",
                "targets": {c: {"min_share": s, "max_partitions": p}
                            for c, (s, p) in TARGETS.items()},
                "components": {c: {ep: r.to_dict() for ep, r in eps.items()}
                               for c, eps in self.components.items()},
                "misses": self.misses}


def measure(graphs: dict[str, Path]) -> Readiness:
    """Readiness of each component graph, and the targets (TARGETS) each one misses."""
    components = {c: check_graph(p) for c, p in graphs.items()}
    misses = []
    for component, (share, parts) in TARGETS.items():
        for ep, r in components.get(component, {}).items():
            if r.share >= share and r.partitions <= parts:
                continue
            why = "; ".join(blockers(r)) or "partitioning"
            misses.append(f"{component} on {EP_TITLES[ep]}: {r.share:.0%} of nodes in "
                          f"{r.partitions} partition(s), target >= {share:.0%} in <= {parts} "
                          f"(blocked by {why})")
    return Readiness(components, misses)


def to_ort_format(graphs: dict[str, Path]) -> dict[str, Path]:
    """Write each graph in ORT format beside it (what ORT Mobile's minimal builds load), by
    `python -m onnxruntime.tools.convert_onnx_models_to_ort` with the "runtime" optimization
    style, which leaves fusions to load time so that NNAPI/CoreML can still claim those nodes.
    Also writes the required-operators config a reduced onnxruntime build takes."""
    import contextlib
    import io

    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    # The converter prints every step and logs each config file it writes at INFO.
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    out = {}
    for component, path in graphs.items():
        with contextlib.redirect_stdout(io.StringIO()):
            convert_onnx_models_to_ort(path, output_dir=path.parent,
                                       optimization_styles=[OptimizationStyle.Runtime])
        out[component] = path.with_suffix(".with_runtime_opt.ort")
        assert out[component].is_file(), f"the ORT-format converter wrote no {out[component]}"
    return out
