"""TensorRT plugins that must earn their place by measurement.

- :mod:`.query_blur_kernel`: a fused Triton kernel for the SEG query blur
  ``Q'[b] = A_h[b] · Q[b] · A_w[b]ᵀ`` (:func:`~.query_blur_kernel.triton_query_blur`).
- :mod:`.query_blur_plugin`: that kernel as the TensorRT ≥ 10.6 Python plugin
  ``seg_tsam::query_blur`` (:func:`~.query_blur_plugin.register_query_blur_plugin`) and the ONNX
  node that TensorRT's parser maps to it.

The standard-op blur (two batched matmuls in the exported graph,
``seg_tsam.extension.core.blur.apply_blur_matrices``) stays the default and the portable path:
nothing selects the plugin, and nothing should until ``bench/query_blur_kernel.py`` on the target
GPU shows the kernel faster for the shapes that matter. No GPU benchmark has been run yet.
Importing this package, or either module, needs neither triton nor tensorrt.
"""
