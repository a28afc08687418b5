"""ONNX export of the SEG-capable UNet, TensorRT engine building and the engine runtime.

Import as ``seg_tsam.export`` (see ``extension/loader.py``). Heavy packages (onnx,
onnxruntime, tensorrt) are imported inside the functions that use them, never here.
"""
