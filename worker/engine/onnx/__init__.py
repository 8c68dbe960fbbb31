"""ONNX models: onnxruntime.quantization behind one module per method; common.py holds the shared helpers."""
