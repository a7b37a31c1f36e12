"""Ship a converted model: ONNX graphs with a KV cache, re-cast safetensors, and Hub uploads.

The submodules are imported on use, so that `onnx_runtime` (numpy and onnxruntime) loads without PyTorch.
"""
