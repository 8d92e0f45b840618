"""edgevlm.export: a LLaVA checkpoint to the ONNX graphs the torch-free runtime runs.

`export(model_dir, out_dir, ExportConfig(...)) -> ExportResult`; the folder layout and graph IO
are declared in edgevlm.runtime.contract. torch is imported only when exporting.
"""

from edgevlm.export.exporter import ExportConfig, ExportResult, ParityError, export

__all__ = ["ExportConfig", "ExportResult", "ParityError", "export"]
