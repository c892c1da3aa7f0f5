"""Backends behind one interface: ONNX Runtime, TensorRT, PyTorch, and a scripted model for tests."""
