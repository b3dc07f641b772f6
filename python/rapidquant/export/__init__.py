"""Export: ONNX QDQ models and encodings files (rapidquant format, AIMET 1.0.0 and 2.0.0)."""
