"""SEG inside the WebUI's sampling loop, for one generation (one ``p.sample`` call).

The WebUI's ``CFGDenoiser`` lays rows out as ``[cond rows…, uncond rows…]`` and hands them to
its inner model (k-diffusion's ``CompVisDenoiser`` or the timestep denoisers) in one or
several calls. :class:`SegGeneration` hooks that inner model:

- before a call, it appends a copy of every row that needs a SEG twin (cond rows, or uncond
  rows in mode ``uncond``) and asks the :class:`QueryBlurPatch` to blur the copies' queries;
- after the call, it cuts the copies off the output and keeps them per global row;
- the denoiser's ``combine_denoised`` is wrapped to add the SEG term to the WebUI's own CFG
  result. Rows whose twin was not computed (batching off, or the uncond rows dropped in mode
  ``uncond``) are computed there in one extra call.

The inner model's output is what the WebUI combines (x0 for k-diffusion samplers, ε for DDIM/
PLMS/UniPC), and the SEG formula is affine, so it is right in either space. Nothing here
imports the WebUI: it works on the objects the WebUI passes to callbacks. Everything is
installed on an :class:`contextlib.ExitStack` and removed in ``__exit__``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..denoiser_steps import denoiser_progress
from ..unet_layers import self_attention_layers
from ...core.guidance import seg_cond_term, seg_uncond_term
from ...core.layers import select_layers
from ...core.query_blur_patch import ActiveBlur, QueryBlurPatch
from .step_rows import StepRows
from ...core.settings import SegSettings

logger = logging.getLogger("seg_tsam")


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor of a conditioning structure (tensor, dict, list, tuple)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(item, fn) for item in value)
    return value


def concat_structures(parts: Sequence[Any]) -> Any:
    """Concatenate along rows several conditioning structures of the same shape."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts))
    if isinstance(first, dict):
        return {key: concat_structures([part[key] for part in parts]) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(concat_structures(items) for items in zip(*parts))
    return first


def _rows_for_call(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """A conditioning tensor cut to the call's rows.

    When the WebUI drops the uncond rows (skip-early-CFG, negative-guidance minimum σ) it trims
    ``x`` but not ``image_cond``, so ``c_concat`` can hold more rows than the call; its leading
    rows are the ones that belong to the call.
    """
    if tensor.shape[0] < rows:
        raise RuntimeError(f"SEG: a conditioning tensor has {tensor.shape[0]} rows, the call has {rows}")
    return tensor[:rows]


def take_rows(value: Any, index: torch.Tensor, rows: int) -> Any:
    """The rows ``index`` of every tensor in ``value`` (a structure for a call of ``rows`` rows)."""
    return map_tensors(value, lambda tensor: _rows_for_call(tensor, rows).index_select(0, index.to(tensor.device)))


def append_rows(value: Any, index: torch.Tensor, rows: int) -> Any:
    """Every tensor in ``value``, cut to ``rows`` rows, followed by copies of its rows ``index``."""

    def extend(tensor: torch.Tensor) -> torch.Tensor:
        tensor = _rows_for_call(tensor, rows)
        return torch.cat([tensor, tensor.index_select(0, index.to(tensor.device))])

    return map_tensors(value, extend)


def row_count(cond: Any) -> int:
    """Rows of a text conditioning: a tensor, or SDXL's dict with ``crossattn``."""
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[0]


#: id(UNet) -> the SEG patch of the generation running on it (a replacement UNet asks it).
_ACTIVE_PATCHES: dict[int, QueryBlurPatch] = {}


def active_blur(unet: torch.nn.Module) -> ActiveBlur | None:
    """The SEG blur the next call of ``unet`` must apply (``None``: none), for a replacement UNet.

    The WebUI's SD Unet replacement runs *instead of* ``unet``'s modules, so SEG's hooks on them
    do not fire; our replacements (exported engines) read the blur from here instead.
    """
    patch = _ACTIVE_PATCHES.get(id(unet))
    return patch.active_blur() if patch is not None else None


class _Call:
    """One inner-model call: its global rows and inputs (kept for an extra SEG pass)."""

    def __init__(self, model: torch.nn.Module, rows: range, x, sigma, cond):
        self.model, self.rows, self.x, self.sigma, self.cond = model, rows, x, sigma, cond


class SegGeneration:
    """SEG for one generation. Use as a context manager around ``p.sample``."""

    def __init__(self, settings: SegSettings, *, batch_rows: bool = True, max_extra_rows: int | None = None,
                 owner: object = None):
        self.settings = settings
        self.owner = owner  #: the processing object this generation belongs to
        self.batch_rows = batch_rows  #: append SEG rows to the WebUI's calls (else one extra call)
        self.max_extra_rows = max_extra_rows  #: chunk size of the extra call (None: all rows at once)
        self._stack = contextlib.ExitStack()
        # id(inner model) -> (the inner model, its UNet's patch). The model is kept alive so that
        # its id cannot be reused by a later denoiser (hires pass) during this generation.
        self._attached: dict[int, tuple[torch.nn.Module, QueryBlurPatch]] = {}
        self._step: StepRows | None = None
        self._calls: list[_Call] = []
        self._pending: tuple[_Call, list[int], int] | None = None
        self._in_extra_pass = False
        self.steps_guided = 0

    def __enter__(self) -> SegGeneration:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._step, self._pending = None, None
        self._stack.close()
        self._attached.clear()

    # -- WebUI callback: before every denoiser call ------------------------------------------
    def on_cfg_denoiser(self, params) -> None:
        """``script_callbacks.on_cfg_denoiser``: attach to the denoiser, plan this call's rows."""
        denoiser = params.denoiser
        self._step, self._calls, self._pending = None, [], None
        if not self.settings.active_at(*denoiser_progress(denoiser, params)):
            return
        images = row_count(params.text_uncond)
        cond_rows = params.x.shape[0] - images
        if cond_rows != row_count(params.text_cond):
            logger.warning("SEG: unexpected row layout (edit model?); SEG skipped for this step")
            return
        self._attach(denoiser)
        self._step = StepRows(cond_rows, images, self.settings.mode)

    def _attach(self, denoiser) -> None:
        inner = denoiser.inner_model
        if id(inner) in self._attached:
            return
        unet = inner.inner_model.model.diffusion_model
        layers = select_layers(self_attention_layers(unet), self.settings.layers)
        patch = self._stack.enter_context(QueryBlurPatch(layers, self.settings.layers))
        self._attached[id(inner)] = (inner, patch)
        _ACTIVE_PATCHES[id(unet)] = patch
        self._stack.callback(_ACTIVE_PATCHES.pop, id(unet), None)
        handles = [inner.register_forward_pre_hook(self._before_call, with_kwargs=True),
                   inner.register_forward_hook(self._after_call)]
        self._stack.callback(lambda: [handle.remove() for handle in handles])
        self._wrap_combine(denoiser)

    def _wrap_combine(self, denoiser) -> None:
        original = denoiser.combine_denoised

        def combine_denoised(x_out, conds_list, uncond, cond_scale):
            return self._combine(original(x_out, conds_list, uncond, cond_scale), x_out, conds_list)

        denoiser.combine_denoised = combine_denoised

        def restore() -> None:
            if denoiser.__dict__.get("combine_denoised") is combine_denoised:
                del denoiser.combine_denoised  # back to the class method

        self._stack.callback(restore)

    # -- inner-model hooks ----------------------------------------------------------------------
    def _before_call(self, module, args: tuple, kwargs: dict):
        step = self._step
        if step is None or self._in_extra_pass:
            return None
        x, sigma = args[0], args[1]
        call = _Call(module, step.next_call(x.shape[0]), x, sigma, kwargs.get("cond"))
        self._calls.append(call)
        local = step.candidates_in(call.rows) if self.batch_rows else []
        if not local:
            return None
        base = x.shape[0]
        index = torch.tensor(local, device=x.device)
        total = base + len(local)
        self._attached[id(module)][1].request_blur(range(base, total), total, self.settings.sigma)
        self._pending = (call, local, base)
        new_args = (append_rows(x, index, base), append_rows(sigma, index, base), *args[2:])
        return new_args, {**kwargs, "cond": append_rows(kwargs.get("cond"), index, base)}

    def _after_call(self, module, args: tuple, output: torch.Tensor):
        if self._pending is None or self._in_extra_pass:
            return None
        call, local, base = self._pending
        self._pending = None
        self._attached[id(module)][1].clear_request()
        for offset, position in enumerate(local):
            self._step.blurred[call.rows.start + position] = output[base + offset]
        return output[:base]

    # -- the combination --------------------------------------------------------------------------
    def _combine(self, denoised: torch.Tensor, x_out: torch.Tensor, conds_list) -> torch.Tensor:
        step = self._step
        if step is None:
            return denoised
        if step.missing():
            self._extra_pass(step.missing())
        blurred = torch.stack([step.blurred[row] for row in step.required()])
        scale = self.settings.scale
        if step.blurs_uncond:
            term = seg_uncond_term(x_out[-step.images:], blurred, scale)
        else:
            term = seg_cond_term(x_out[: step.cond_rows], blurred, conds_list, scale)
        self.steps_guided += 1
        return denoised + term.to(denoised.dtype)

    def _extra_pass(self, rows: list[int]) -> None:
        """Compute the blurred twins of ``rows`` in extra inner-model calls (rows share a token length)."""
        pieces = []
        for call in self._calls:
            local = [row - call.rows.start for row in rows if row in call.rows]
            if local:
                index = torch.tensor(local, device=call.x.device)
                pieces.append((call, local, index))
        model = pieces[0][0].model
        x = torch.cat([call.x.index_select(0, index) for call, _, index in pieces])
        sigma = torch.cat([call.sigma.index_select(0, index.to(call.sigma.device)) for call, _, index in pieces])
        cond = concat_structures([take_rows(call.cond, index, call.x.shape[0]) for call, _, index in pieces])
        chunk = self.max_extra_rows or len(rows)
        patch = self._attached[id(model)][1]
        self._in_extra_pass = True
        try:
            for start in range(0, len(rows), chunk):
                part = torch.arange(start, min(start + chunk, len(rows)), device=x.device)
                count = part.numel()
                with patch.blurring(range(count), count, self.settings.sigma):
                    out = model(x.index_select(0, part), sigma.index_select(0, part.to(sigma.device)),
                                cond=take_rows(cond, part, len(rows)))
                for offset, row in enumerate(rows[start:start + count]):
                    self._step.blurred[row] = out[offset]
        finally:
            self._in_extra_pass = False

