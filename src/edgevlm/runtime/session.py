"""ONNX Runtime sessions: execution providers by short name, thread count, clear load errors.

A provider is named the way a user thinks of the hardware ("cuda", "qnn", "coreml") and mapped
to ONNX Runtime's provider name. Each onnxruntime wheel carries only some providers, so asking
for one the installed wheel lacks says which package has it, instead of onnxruntime's silent
fallback to CPU. "auto" picks the best provider this wheel offers and `Provider.chosen` reports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from edgevlm.errors import UserError
from edgevlm.runtime.limits import check_threads

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "dml": "DmlExecutionProvider",
}
CHOICES = ("auto", *PROVIDERS)

# Where each provider ships: the fix a user needs when theirs is missing.
PACKAGES = {
    "cuda": "pip install onnxruntime-gpu (and a matching CUDA/cuDNN)",
    "tensorrt": "pip install onnxruntime-gpu (and install TensorRT)",
    "qnn": "pip install onnxruntime-qnn (Windows on Snapdragon / Qualcomm devices)",
    "dml": "pip install onnxruntime-directml (Windows)",
    "coreml": "the onnxruntime wheel for macOS, or the onnxruntime iOS builds "
              "(onnxruntime-objc / onnxruntime-c pods)",
    "nnapi": "the onnxruntime-android package (Android AAR)",
    "cpu": "pip install onnxruntime",
}

# "auto" order. TensorRT is left out on purpose: it compiles an engine per new input shape, and
# a decoder whose KV cache grows every step would recompile constantly; ask for it by name.
AUTO_ORDER = ("cuda", "coreml", "qnn", "dml", "nnapi", "cpu")

# Where presents/pasts may stay between decoder steps (IOBinding device names).
DEVICE_TYPES = {"cuda": "cuda", "tensorrt": "cuda"}

# Providers behind the chosen one, for the nodes it does not take: TensorRT has no kernel for
# onnxruntime's contrib ops (MatMulNBits of an int4 decoder), which then run on CUDA, not CPU.
FALLBACKS = {"tensorrt": ("CUDAExecutionProvider", "CPUExecutionProvider")}


@dataclass(frozen=True)
class TensorrtConfig:
    """TensorRT builds an engine per graph (minutes for a large decoder): keep them in
    `cache_dir` so the next load reuses them, and build them in fp16 unless told not to."""

    cache_dir: Path
    fp16: bool = True

    def options(self) -> dict[str, str]:
        """The TensorRT provider's options (onnxruntime's names; values as strings)."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(self.cache_dir),
                "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(self.cache_dir),
                "trt_fp16_enable": str(self.fp16)}


def provider_chain(provider: Provider, trt: TensorrtConfig | None = None) -> list:
    """onnxruntime's `providers` list: the chosen provider (with its options) then fallbacks."""
    first = provider.ort_name
    if provider.chosen == "tensorrt" and trt is not None:
        first = (provider.ort_name, trt.options())
    if provider.chosen == "cpu":
        return [first]
    return [first, *FALLBACKS.get(provider.chosen, ("CPUExecutionProvider",))]


@dataclass(frozen=True)
class SessionConfig:
    """How every graph of an export is run: one provider, optional intra-op thread count."""

    provider: str = "auto"
    threads: int | None = None

    def __post_init__(self):
        if self.provider not in CHOICES:
            raise UserError(f"provider {self.provider!r} is unknown; choose one of "
                            f"{', '.join(CHOICES)}")
        check_threads(self.threads)  # 1 to the usable cores (runtime.limits)


@dataclass(frozen=True)
class Provider:
    """The provider actually chosen: short name, ORT name, and where KV tensors may live."""

    chosen: str
    ort_name: str

    @property
    def device_type(self) -> str:
        return DEVICE_TYPES.get(self.chosen, "cpu")


def available() -> list[str]:
    """Short names of the providers this onnxruntime wheel offers."""
    have = set(ort.get_available_providers())
    return [short for short, name in PROVIDERS.items() if name in have]


def resolve(provider: str) -> Provider:
    """The provider to use for `provider` ("auto" or a short name), or a UserError with the fix."""
    SessionConfig(provider)  # validates the name
    have = available()
    if provider == "auto":
        short = next(p for p in AUTO_ORDER if p in have or p == "cpu")
        return Provider(short, PROVIDERS[short])
    if provider not in have:
        raise UserError(f"execution provider {provider!r} ({PROVIDERS[provider]}) is not in this "
                        f"onnxruntime {ort.__version__} install (it has: {', '.join(have)}); "
                        f"to get it: {PACKAGES[provider]}")
    return Provider(provider, PROVIDERS[provider])


def options(threads: int | None, provider: str = "cpu", spin: bool = True) -> ort.SessionOptions:
    """Session options; `spin` False: the intra-op threads sleep as soon as a run ends instead of
    spinning for more work, so a session that runs once between another's runs (the vision
    encoder before prefill, the embedding before each decode step) does not take the cores the
    next session's threads need."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: a user should not see ORT's provider chatter
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if provider == "dml":  # DirectML supports neither memory patterns nor parallel execution
        opts.enable_mem_pattern = False
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


def open_session(path: str | Path, provider: Provider, threads: int | None = None,
                 strict: bool = True, trt: TensorrtConfig | None = None, spin: bool = True
                 ) -> tuple[ort.InferenceSession, Provider]:
    """An InferenceSession on `provider` (CPU kept as fallback for ops the provider lacks) and
    the provider it really runs on. onnxruntime quietly drops a provider that fails to start
    (a missing CUDA library, say); `strict` turns that into a UserError, otherwise ("auto") the
    run goes on with CPU and says so."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"graph {path} is missing; re-run `edgevlm export` to rebuild the export")
    check_threads(threads)  # every session, whoever opens it (run, bench, the API)
    chain = provider_chain(provider, trt)
    try:
        session = ort.InferenceSession(str(path), sess_options=options(threads, provider.chosen,
                                                                      spin),
                                       providers=chain)
    except Exception as e:  # ORT raises its own pybind types (InvalidProtobuf, Fail, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        missing = missing_op(first)
        if missing:
            raise UserError(missing_op_message(missing, path, chain)) from e
        raise UserError(f"graph {path} could not be loaded by onnxruntime {ort.__version__} "
                        f"({first}); the file is corrupt or incomplete — re-run `edgevlm export`"
                        ) from e
    if provider.ort_name in session.get_providers():
        return session, provider
    if strict:
        raise UserError(f"execution provider {provider.chosen!r} is installed but failed to "
                        f"start for {path.name}; check the drivers and libraries it needs "
                        f"({PACKAGES[provider.chosen]}) or use --provider cpu")
    return session, Provider("cpu", PROVIDERS["cpu"])


# The contrib ops an export may need that older or narrower onnxruntime builds lack, and a
# release that has them on the CPU: MoE and QMoE (a mixture-of-experts FFN, block-wise int4)
# with the QMoE threading fix of onnxruntime#29081; edgevlm's tests run on 1.32.
OPS_SINCE = {"MoE": "1.27.1", "QMoE": "1.27.1", "GroupQueryAttention": "1.17",
             "MatMulNBits": "1.17"}


def missing_op(message: str) -> str | None:
    """The op named by onnxruntime's "Could not find an implementation for OP(version) node"
    error, when it is one of OPS_SINCE."""
    import re

    m = re.search(r"Could not find an implementation for (\w+)\(", message)
    return m.group(1) if m and m.group(1) in OPS_SINCE else None


def missing_op_message(op: str, path: Path, chain: list) -> str:
    names = [p if isinstance(p, str) else p[0] for p in chain]
    what = " (a mixture-of-experts FFN)" if op in ("MoE", "QMoE") else ""
    return (f"graph {Path(path).name} uses onnxruntime's {op} op{what}, which this onnxruntime "
            f"({ort.__version__}, {', '.join(names)}) has no kernel for; install onnxruntime >= "
            f"{OPS_SINCE[op]} (it has CPU kernels), or run on CPUExecutionProvider")


def check_io(session: ort.InferenceSession, path: str | Path, inputs, outputs) -> None:
    """The graph has the inputs and outputs the artifact contract names, or a UserError."""
    have_in = {i.name for i in session.get_inputs()}
    have_out = {o.name for o in session.get_outputs()}
    missing = [n for n in inputs if n not in have_in] + [n for n in outputs if n not in have_out]
    if missing:
        raise UserError(f"graph {path} lacks the inputs/outputs {', '.join(missing[:6])}"
                        f"{' ...' if len(missing) > 6 else ''} that the edgevlm contract names; "
                        "it was not made by `edgevlm export` or by a matching version")
    unfed = [i.name for i in session.get_inputs() if i.name not in inputs]
    if unfed:
        more = " ..." if len(unfed) > 4 else ""
        raise UserError(f"graph {path} takes inputs the runtime would not feed "
                        f"({', '.join(unfed[:4])}{more}): edgevlm.json does not describe it "
                        "(num_layers lower than the graph's?); re-export")


def check_past(session: ort.InferenceSession, path: str | Path, num_layers: int, kv_heads: int,
               head_dim: int) -> None:
    """The decoder graph takes a past for at least edgevlm.json's num_layers (checked before the
    IO names of that many layers are made: a crafted 10^9 would take all memory), with its
    num_kv_heads and head_dim where the graph fixes them (a traced decoder's empty first past
    is made from them)."""
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    if num_layers > len(pasts) // 2:
        raise UserError(f"edgevlm.json says num_layers={num_layers} but graph {Path(path).name} "
                        f"takes the past of {len(pasts) // 2} layers; re-export")
    shape = pasts[0].shape if pasts else []
    for axis, name, value in ((1, "num_kv_heads", kv_heads), (3, "head_dim", head_dim)):
        if len(shape) == 4 and isinstance(shape[axis], int) and shape[axis] != value:
            raise UserError(f"edgevlm.json says {name}={value} but graph {Path(path).name} has "
                            f"{shape[axis]}; re-export")
