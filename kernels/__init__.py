"""retrv.kernels: the fused ICM attention kernel.

- `reference`   the ICM's attention cores in plain PyTorch (`pool`, `cross`, `relation_pool`, `icm_attention`): the
                oracle every other implementation must match.
- `split`       the ICM of `model/icm.py` rewritten around those cores: what the kernel computes, what stays in the
                graph, and why the relation step's R is still written for this model.
- `triton_icm`  the Triton kernel (one launch per call, grid candidates x heads x tokens) and `aot_compile`.
- `trt_plugin`  the cores as ONNX custom-domain ops (`retrv::`) and TensorRT Python plugins.

Importing this package imports nothing heavy: torch comes with the submodules, triton and tensorrt only when a
function that needs them runs.
"""
