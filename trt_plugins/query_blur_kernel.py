"""A fused Triton kernel for the SEG query blur ``Q'[b] = A_h[b] · Q[b] · A_w[b]ᵀ`` (per channel).

Why it exists: the exported graph applies the blur with two batched matmuls and reshapes
(:func:`~seg_tsam.extension.core.blur.apply_blur_matrices`), which write the intermediate
``A_h · Q`` to memory and read it back. This kernel keeps that intermediate on chip and skips
the query rows whose ``A_h`` weight is zero, so an identity row (every cond/uncond row of a
SEG call) reads its queries once. Whether that is faster than TensorRT's own matmuls depends
on the GPU and the shapes; ``bench/query_blur_kernel.py`` measures it. Until a benchmark on the
target shows a win, nothing uses this kernel: the standard-op blur stays the default.

Layout: ``queries`` is a contiguous ``(B, h·w, C)`` tensor whose tokens are a row-major
``h × w`` grid, ``a_h`` is ``(B, h, h)`` and ``a_w`` is ``(B, w, w)``, all of one dtype
(float16 or float32) on one CUDA device. Accumulation is float32.

Algorithm: one program per ``(b, output row i, block of BLOCK_C channels)``. For each block
of ``BLOCK_K`` output columns ``k`` and each block of ``BLOCK_L`` input columns ``l``:

1. ``U[l, c] = Σ_j A_h[b, i, j] · Q[b, j, l, c]``, a weighted sum of ``h`` query tiles in
   registers (float32). The load of tile ``j`` is masked off when ``A_h[b, i, j] == 0``, so
   no memory is read for it (identity rows read one tile, a σ-Gaussian row about ``6σ``).
2. ``acc[k, c] += Σ_l A_w[b, k, l] · U[l, c]`` with ``tl.dot`` (IEEE float32 for float32
   inputs, so no TF32 rounding; float16 operands with a float32 accumulator for float16).

Every load and store is masked on all edges, and every block size is at least 16 (``tl.dot``'s
minimum), so any ``h``, ``w``, ``C`` ≥ 1 works, 1×1 and 1×n grids included.

Cost per batch row, with ``nnz_i`` the nonzeros of row ``i`` of ``A_h`` and
``n_k = ceil(w / BLOCK_K)`` (1 for ``w ≤ 64``): query reads ``Σ_i nnz_i · w · C · n_k`` elements
(mostly L2 hits; ``h²·w·C`` for a dense σ=∞ row, against about ``4·h·w·C`` of DRAM traffic
for the two matmuls: read Q, write and re-read ``A_h · Q``, write the result), FMAs
``h² · w · C · n_k`` (masked tiles still cost their FMAs) plus ``h · w² · C`` in ``tl.dot``, one
write of ``h·w·C``. Dense rows therefore re-read the queries ``h`` times from cache; the kernel
can only pay off when most rows are identity or narrow Gaussians, which is what the benchmark
is for. Block sizes and warps are untuned.

Status: checked against the reference in Triton's CPU interpreter (``TRITON_INTERPRET=1``) and
compiled for sm_90 with Triton 3.1 and 3.9 (3.9: no register spills); never run or timed on a GPU.

Triton is imported on first use only (:func:`load_triton_kernel`), so importing this module
needs neither triton nor CUDA. Triton ≥ 3.0 is required (``tl.dot(..., input_precision=...)``).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch

#: Block sizes: ``tl.dot`` needs every dimension ≥ 16; 64 keeps a tile of each operand in registers.
MIN_BLOCK = 16
MAX_BLOCK_SPATIAL = 64
BLOCK_CHANNELS = 32
NUM_WARPS = 4

SUPPORTED_DTYPES = (torch.float16, torch.float32)

#: ``triton.language``, bound by :func:`load_triton_kernel` on first use. The kernel body below
#: reads ``tl`` as a module global, which is how Triton resolves names when it compiles; binding
#: it lazily keeps ``import`` of this module free of triton (the annotations are strings, thanks
#: to ``from __future__ import annotations``, and Triton reads ``"tl.constexpr"`` from them).
tl: Any = None


def _query_blur_kernel(
    q_ptr,
    ah_ptr,
    aw_ptr,
    out_ptr,
    height,
    width,
    channels,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    IS_FP32: tl.constexpr,
):
    """Triton kernel body (compiled by :func:`load_triton_kernel`); grid ``(B·h, ceil(C / BLOCK_C))``."""
    row = tl.program_id(0)  # b * h + i
    c_block = tl.program_id(1)
    b = (row // height).to(tl.int64)
    i = (row % height).to(tl.int64)
    plane = height * width * channels  # elements of one batch row of queries / output

    offs_c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    q_base = q_ptr + b * plane
    ah_row = ah_ptr + b * height * height + i * height
    aw_base = aw_ptr + b * width * width
    out_row = out_ptr + b * plane + i * width * channels

    for k0 in range(0, width, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < width
        acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
        for l0 in range(0, width, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            mask_l = offs_l < width
            tile_offsets = offs_l[:, None] * channels + offs_c[None, :]
            # Stage 1: U = Σ_j A_h[b, i, j] · Q[b, j, l-block, c-block]. A zero weight sets the
            # column limit to 0, so the masked load reads no memory for that query row.
            u = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
            for j in range(height):
                weight = tl.load(ah_row + j).to(tl.float32)
                l_limit = tl.where(weight != 0.0, width, 0)
                tile_mask = (offs_l[:, None] < l_limit) & mask_c[None, :]
                tile = tl.load(q_base + j * width * channels + tile_offsets, mask=tile_mask, other=0.0)
                u += weight * tile.to(tl.float32)
            # Stage 2: acc += A_w[b, k-block, l-block] · U.
            a_w = tl.load(aw_base + offs_k[:, None] * width + offs_l[None, :],
                          mask=mask_k[:, None] & mask_l[None, :], other=0.0)
            if IS_FP32:
                acc = tl.dot(a_w, u, acc=acc, input_precision="ieee")
            else:
                acc = tl.dot(a_w, u.to(a_w.dtype), acc=acc)
        out_offsets = offs_k[:, None] * channels + offs_c[None, :]
        tl.store(out_row + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_c[None, :])


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (not whether a GPU is present)."""
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=1)
def load_triton_kernel() -> Any:
    """Import triton, bind ``tl`` and return the jitted kernel (once per process).

    Raises :class:`RuntimeError` when triton is missing or older than 3.0, or when torch sees no
    CUDA device (Triton compiles for the GPU it finds, so there is nothing to compile for).
    """
    global tl
    if not triton_available():
        raise RuntimeError(
            "the Triton query-blur kernel needs the 'triton' package (≥ 3.0), which is not installed; "
            "use the standard-op blur (seg_tsam.extension.core.blur.apply_blur_matrices) instead"
        )
    if not torch.cuda.is_available():
        raise RuntimeError("the Triton query-blur kernel needs a CUDA device, and torch sees none")
    import triton
    from triton import language

    major = int(str(triton.__version__).split(".", 1)[0])
    if major < 3:
        raise RuntimeError(f"the Triton query-blur kernel needs triton ≥ 3.0, found {triton.__version__}")
    tl = language
    return triton.jit(_query_blur_kernel)


def validate_query_blur_operands(
    queries: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[int, int, int, int]:
    """Check shapes, dtypes and devices; return ``(B, h, w, C)``. Raises :class:`ValueError`.

    Runs before triton is imported, so a caller's mistake is reported the same way everywhere.
    """
    if queries.dim() != 3:
        raise ValueError(f"queries must be (B, h·w, C), got shape {tuple(queries.shape)}")
    if a_h.dim() != 3 or a_w.dim() != 3 or a_h.shape[1] != a_h.shape[2] or a_w.shape[1] != a_w.shape[2]:
        raise ValueError(
            f"blur matrices must be (B, h, h) and (B, w, w), got {tuple(a_h.shape)} and {tuple(a_w.shape)}"
        )
    batch, tokens, channels = (int(size) for size in queries.shape)
    height, width = int(a_h.shape[1]), int(a_w.shape[1])
    if a_h.shape[0] != batch or a_w.shape[0] != batch:
        raise ValueError(f"blur matrices hold {a_h.shape[0]}/{a_w.shape[0]} rows, the queries {batch}")
    if height * width != tokens:
        raise ValueError(f"blur matrices for a {height}×{width} grid ({height * width} tokens), "
                         f"but the queries have {tokens} tokens")
    if batch < 1 or tokens < 1 or channels < 1:
        raise ValueError(f"queries must be non-empty, got shape {tuple(queries.shape)}")
    if queries.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"queries must be float16 or float32, got {queries.dtype}")
    if a_h.dtype != queries.dtype or a_w.dtype != queries.dtype:
        raise ValueError(f"blur matrices are {a_h.dtype}/{a_w.dtype}, the queries {queries.dtype}; they must match")
    if a_h.device != queries.device or a_w.device != queries.device:
        raise ValueError(f"queries on {queries.device}, blur matrices on {a_h.device}/{a_w.device}: use one device")
    if queries.device.type != "cuda":
        raise ValueError(
            f"the Triton query blur runs on CUDA tensors, got {queries.device}; on other devices use the "
            "standard-op blur (seg_tsam.extension.core.blur.apply_blur_matrices)"
        )
    if out is not None:
        if out.shape != queries.shape or out.dtype != queries.dtype or out.device != queries.device:
            raise ValueError(f"out must be a {queries.dtype} tensor of shape {tuple(queries.shape)} on "
                             f"{queries.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    return batch, height, width, channels


def _block(size: int, cap: int) -> int:
    """Next power of two ≥ ``size``, clamped to ``[MIN_BLOCK, cap]``."""
    return max(MIN_BLOCK, min(cap, 1 << max(0, size - 1).bit_length()))


def triton_query_blur(
    queries: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``Q'[b] = A_h[b] · Q[b] · A_w[b]ᵀ`` per channel with the fused Triton kernel.

    Same contract as :func:`~seg_tsam.extension.core.blur.apply_blur_matrices` (``(B, h·w, C)``
    queries, ``(B, h, h)`` and ``(B, w, w)`` matrices, ``h``/``w`` from their shapes), limited to
    float16/float32 CUDA tensors. Non-contiguous inputs are copied to contiguous ones. ``out``
    (contiguous, same shape/dtype/device, not aliasing the inputs) receives the result; the
    TensorRT plugin passes its output buffer here. Launches on the current CUDA stream.

    Raises :class:`ValueError` for bad operands (checked first) and :class:`RuntimeError` when
    triton or CUDA is missing.
    """
    batch, height, width, channels = validate_query_blur_operands(queries, a_h, a_w, out)
    kernel = load_triton_kernel()
    queries, a_h, a_w = queries.contiguous(), a_h.contiguous(), a_w.contiguous()
    if out is None:
        out = torch.empty_like(queries)
    block_c = BLOCK_CHANNELS if channels > MIN_BLOCK else MIN_BLOCK
    grid = (batch * height, -(-channels // block_c))
    with torch.cuda.device(queries.device):
        kernel[grid](
            queries, a_h, a_w, out, height, width, channels,
            BLOCK_K=_block(width, MAX_BLOCK_SPATIAL),
            BLOCK_L=_block(width, MAX_BLOCK_SPATIAL),
            BLOCK_C=block_c,
            IS_FP32=queries.dtype == torch.float32,
            num_warps=NUM_WARPS,
        )
    return out
