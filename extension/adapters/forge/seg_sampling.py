"""SEG in the Forge family's sampling function (Forge Neo, Forge, reForge), for one generation.

These hosts batch a step's conditions themselves: each condition (the uncond, every AND
sub-prompt) is a *chunk* of ``B`` rows, one per image, and the chunks go to the UNet in one
call or, when memory is short, in several (``cond_or_uncond`` flags each chunk, 0 = cond,
1 = uncond; the chunks arrive in reverse order of the host's condition list). Then the host
averages the cond chunks weighted by their strengths (the AND weights), applies CFG and calls
its post-CFG functions. :class:`ForgeSegGeneration` works through the per-generation clone of
the host's ``UnetPatcher`` and nothing else:

- a **model function wrapper** appends a copy of every chunk that needs a SEG twin (cond
  chunks; uncond chunks in mode ``uncond``) to the host's own UNet call and asks the
  :class:`QueryBlurPatch` to blur the copies' queries; it cuts the copies off the output and
  keeps them. With "same UNet call" off, or when the wanted chunks did not run (uncond skipped),
  the twins are computed in one extra pass through the host's own batching function, every row
  blurred.
- a **post-CFG function** adds the SEG term to the host's CFG result. All predictions are x0
  (denoised); the SEG term is affine with weights summing to 0, so it holds there exactly:
  ``s · Σ_k w_k (c_k − c̃_k)``, with the host's strengths ``w_k``.

The :class:`QueryBlurPatch` records the exact token grid of every layer from its spatial
transformer's input, whatever the size. Its hooks are installed on ``__enter__`` and removed on
``__exit__``; the patcher options live on the clone the host throws away after the generation.
This module imports nothing of the host: the host's batching function is passed in.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...core.layers import select_layers
from ...core.query_blur_patch import QueryBlurPatch
from ...core.settings import SegSettings
from ..denoiser_steps import denoiser_progress
from ..unet_layers import self_attention_layers

logger = logging.getLogger("seg_tsam")

COND, UNCOND = 0, 1

#: ``calc_batch(model, conds, x, sigma, model_options) -> prediction``: the host's weighted
#: average of the UNet's outputs for ``conds`` (a condition list), batched as the host batches.
CalcBatch = Callable[[Any, list, torch.Tensor, torch.Tensor, dict], torch.Tensor]

#: Keys of the UNet call's conditioning whose tensors hold one row per input row.
_ROW_KEYS = ("c_crossattn", "y", "c_concat", "control")


def _append_rows(value: Any, index: torch.Tensor) -> Any:
    """Every tensor in ``value`` (a tensor, or dicts/lists of them) followed by its rows ``index``."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value.index_select(0, index.to(value.device))])
    if isinstance(value, dict):
        return {key: _append_rows(item, index) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_append_rows(item, index) for item in value)
    return value


def _chunk_rows(chunks: Sequence[int], size: int) -> torch.Tensor:
    return torch.cat([torch.arange(chunk * size, (chunk + 1) * size) for chunk in chunks])


@dataclass
class _Step:
    """One denoiser step's SEG state."""

    pairs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=lambda: {COND: [], UNCOND: []})
    ran: set[int] = field(default_factory=set)  #: which kinds of chunk (cond, uncond) the host ran


class ForgeSegGeneration:
    """SEG for one generation on a Forge-family host. Use as a context manager around ``p.sample``;
    call :meth:`patch` from ``process_before_every_sampling`` (every pass, hires included)."""

    def __init__(self, settings: SegSettings, *, batch_rows: bool, calc_batch: CalcBatch, owner: object = None):
        self.settings = settings
        self.owner = owner
        self.batch_rows = batch_rows
        self.calc_batch = calc_batch
        self._stack = contextlib.ExitStack()
        self._patches: dict[int, tuple[torch.nn.Module, QueryBlurPatch]] = {}
        self._step: _Step | None = None
        self._patch: QueryBlurPatch | None = None
        self._blur_all = False
        self.steps_guided = 0
        #: ``(clone, the patcher it was cloned from)`` per pass, so the host's object can be put back
        self.patched: list[tuple[Any, Any]] = []

    def __enter__(self) -> ForgeSegGeneration:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._step = None
        self._stack.close()
        self._patches.clear()

    # -- set-up, per sampling pass ------------------------------------------------------------------
    def patch(self, unet_patcher: Any) -> Any:
        """A clone of the host's ``UnetPatcher`` with SEG's wrapper and post-CFG function."""
        unet = unet_patcher.clone()
        self.patched.append((unet, unet_patcher))
        self._patch = self._patch_for(unet.model.diffusion_model)
        previous = unet.model_options.get("model_function_wrapper")

        def model_function_wrapper(apply_model, args):
            return self._call(previous, apply_model, args)

        def post_cfg(args):
            return self._combine(args)

        unet.set_model_unet_function_wrapper(model_function_wrapper)
        unet.set_model_sampler_post_cfg_function(post_cfg)
        return unet

    def _patch_for(self, module: torch.nn.Module) -> QueryBlurPatch:
        if id(module) not in self._patches:
            layers = select_layers(self_attention_layers(module), self.settings.layers)
            patch = self._stack.enter_context(QueryBlurPatch(layers, self.settings.layers))
            self._patches[id(module)] = (module, patch)  # the module is kept so its id stays unique
        return self._patches[id(module)][1]

    # -- host callback: before every denoiser step -------------------------------------------------
    def on_cfg_denoiser(self, params: Any) -> None:
        active = self.settings.active_at(*denoiser_progress(params.denoiser, params))
        self._step = _Step() if active else None

    # -- the UNet call (model function wrapper) ----------------------------------------------------
    def _call(self, previous: Callable | None, apply_model: Callable, args: dict) -> torch.Tensor:
        run = previous or (lambda apply, a: apply(a["input"], a["timestep"], **a["c"]))
        step, patch = self._step, self._patch
        if step is None or patch is None:
            return run(apply_model, args)
        x = args["input"]
        if self._blur_all:  # the extra pass: every row is a twin
            with patch.blurring(range(x.shape[0]), x.shape[0], self.settings.sigma):
                return run(apply_model, args)
        flags = list(args["cond_or_uncond"])
        step.ran.update(flags)
        size = x.shape[0] // len(flags)
        wanted = COND if self.settings.mode == "cond" else UNCOND
        twins = [chunk for chunk, flag in enumerate(flags) if flag == wanted] if self.batch_rows else []
        if not twins:
            return run(apply_model, args)
        index = _chunk_rows(twins, size).to(x.device)
        base, total = x.shape[0], x.shape[0] + index.numel()
        c = dict(args["c"])
        for key in _ROW_KEYS:
            if c.get(key) is not None:
                c[key] = _append_rows(c[key], index)
        c["transformer_options"] = _with_twin_flags(c.get("transformer_options", {}), flags, twins, size)
        extended = {**args, "input": _append_rows(x, index), "timestep": _append_rows(args["timestep"], index),
                    "c": c, "cond_or_uncond": c["transformer_options"]["cond_or_uncond"]}
        with patch.blurring(range(base, total), total, self.settings.sigma):
            out = run(apply_model, extended)
        for position, chunk in enumerate(twins):
            plain = out[chunk * size:(chunk + 1) * size]
            twin = out[base + position * size:base + (position + 1) * size]
            step.pairs[wanted].append((plain, twin))
        return out[:base]

    # -- the combination (post-CFG function) -------------------------------------------------------
    def _combine(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        step = self._step
        if step is None:
            return denoised
        if self.settings.mode == "uncond" and UNCOND in step.ran:
            kind, conds, prediction = UNCOND, args["uncond"], args["uncond_denoised"]
        else:
            kind, conds, prediction = COND, args["cond"], args["cond_denoised"]
        weights = [float(item.get("strength", 1.0)) for item in conds]
        blurred = self._blurred_prediction(step, kind, conds, weights, args)
        self._step = None  # the term is added once per step, whatever else the host runs after
        term = (prediction - blurred) * (self.settings.scale * sum(weights))
        self.steps_guided += 1
        return denoised + term.to(denoised.dtype)

    def _blurred_prediction(self, step: _Step, kind: int, conds: list, weights: list[float], args: dict) -> torch.Tensor:
        """``Σ_k w_k c̃_k / Σ_k w_k``: the host's own weighting of the twins."""
        pairs = step.pairs[kind][:len(conds)]  # later calls (another extension's extra pass) are not ours
        if len(pairs) == len(conds):
            # The host sends its condition list in reverse order (see the module docstring).
            twins = [twin for _, twin in reversed(pairs)]
            total = sum(twin * weight for twin, weight in zip(twins, weights))
            return total / sum(weights)
        self._blur_all = True
        try:
            return self.calc_batch(args["model"], conds, args["input"], args["sigma"], args["model_options"])
        finally:
            self._blur_all = False


def _with_twin_flags(options: dict, flags: list[int], twins: list[int], size: int) -> dict:
    """The call's transformer options for the rows with the twin chunks appended: their flags,
    and the per-row mark and index lists the host derives from the flags (Forge, Forge Neo)."""
    options = dict(options)
    extended = flags + [flags[chunk] for chunk in twins]
    options["cond_or_uncond"] = extended
    uuids = options.get("uuids")
    if isinstance(uuids, list) and len(uuids) == len(flags):  # reForge: one per chunk
        options["uuids"] = uuids + [uuids[chunk] for chunk in twins]
    mark = options.get("cond_mark")
    if isinstance(mark, torch.Tensor) and mark.shape[0] == len(flags) * size:
        options["cond_mark"] = torch.cat([mark, mark.index_select(0, _chunk_rows(twins, size).to(mark.device))])
    if "cond_indices" in options or "uncond_indices" in options:
        options["cond_indices"] = [row for chunk, flag in enumerate(extended) if flag == COND
                                   for row in range(chunk * size, (chunk + 1) * size)]
        options["uncond_indices"] = [row for chunk, flag in enumerate(extended) if flag == UNCOND
                                     for row in range(chunk * size, (chunk + 1) * size)]
    return options
