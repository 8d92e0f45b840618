"""`edgevlm bench` and `edgevlm plan`: the harness that measures targets side by side (harness),
its report (report: bench.json, bench.md, bench.png), the planner that picks among reports for a
budget (plan), and the torch model as a target (torch_target, imported only for model folders).
Built on edgevlm.runtime, which never imports it back; torch-free but for torch_target, so an
export is benched with the device install."""
