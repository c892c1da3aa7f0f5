"""retrv.calibration: INT8/INT4 quantization of a pack with ONNX Runtime's quantization tools, the calibration
data readers that feed them real corpus inputs, and the accuracy gate every quantized pack passes before it is
written.

    from retrv.calibration.quantize import Int4WeightOnlyConfig, quantize_pack
    quantize_pack("pack/", "pack-int4/", Int4WeightOnlyConfig(block_size=32, algo="rtn"))

Modules: `config` (the frozen configs, stdlib only), `quantize` (entry point and one handler per config type),
`rules` (what stays in float), `readers` (CalibrationDataReaders), `gates` (the accuracy gate), `cli`
(`register(subparsers)` for `retrv quantize`), `torch_quant` (bitsandbytes INT8/NF4 for the PyTorch fallback).
Nothing heavy is imported here: `retrv.calibration.cli` builds its parser without onnx or onnxruntime.
"""
