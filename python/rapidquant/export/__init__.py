"""Export: ONNX QDQ models and encodings files (rapidquant format, AIMET 1.0.0 and 2.0.0)."""
from rapidquant.export.runtime import OnnxRuntimeModule, make_session  # noqa: E402,F401
from rapidquant.export.onnx_qdq import ExportResult, Parity, check_parity, export_sim  # noqa: E402,F401
