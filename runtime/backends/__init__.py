"""Backends behind one interface: ONNX Runtime (`ort`) and TensorRT (`trt`) here; the PyTorch fallback registers
itself from `retrv.export.torch_backend` (it needs the model); a scripted model for tests lives in tests/."""
