"""Run a registered SEG engine as the WebUI's UNet (``modules.sd_unet``). UNVERIFIED: written
against TensorRT 10's name-based tensor API and WebUI 1.10.1's ``sd_unet``; no GPU or TensorRT
was available where it was written, so nothing here has been run.

One engine call runs every row of a step (cond, uncond, SEG twins): the blur matrices for the
current σ are built on the host side (:func:`blur_matrix_inputs`: identity rows for unblurred
rows) and fed as graph inputs. Whenever the engine cannot take a call (size, batch, token count
outside its profile, inputs the graph does not have such as ControlNet's, no CUDA tensor), the
call runs through the original PyTorch UNet and a message says why, once per reason.

Which rows are blurred, and with which σ, is asked of ``blur_request`` for every call:
``None`` (no SEG in this call) or ``(rows, sigma)``. The caller wires it to the SEG runtime
(its ``QueryBlurPatch`` request); the SEG hooks on the PyTorch modules do not fire while the
engine runs, so the engine's exported layer set must be the one the generation asked for
(the registry lookup checks this with ``EngineQuery.seg_layers``).

Module import touches neither tensorrt nor ``modules.*``; the ``SdUnet`` subclass is made by
:func:`make_sd_unet_option` inside the WebUI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .profiles import EngineCall, EngineProfile, blur_input_level
from .seg_unet import CONTEXT, OUTPUT, SAMPLE, TIMESTEP, blur_matrix_inputs

logger = logging.getLogger("seg_tsam")

BlurRequest = Callable[[], "tuple[Sequence[int], float] | None"]
Fallback = Callable[..., torch.Tensor]  #: the original UNet forward: ``(x, timesteps, context, *args, **kwargs)``


class EngineCannotRun(RuntimeError):
    """This call is outside what the engine takes; the message says why (shown to the user)."""


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64}
    return table[dtype]


class EngineRunner:
    """A deserialised engine and one execution context; ``run`` takes named CUDA tensors."""

    def __init__(self, engine_path: Path | str, profile: EngineProfile):
        import tensorrt as trt

        self.trt = trt
        self.profile = profile
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load the engine {engine_path} (built by another version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.levels = sorted({level for n in self.inputs if (level := blur_input_level(n)) is not None})

    def check(self, x: torch.Tensor, context: torch.Tensor, extra: dict[str, Any]) -> None:
        """Raise :class:`EngineCannotRun` if the engine cannot take this call."""
        if not x.is_cuda:
            raise EngineCannotRun("the latent is not on a CUDA device")
        unknown = sorted(name for name, value in extra.items() if value is not None and name not in self.inputs)
        if unknown:
            raise EngineCannotRun(f"the call has inputs the engine was not exported with: {unknown}")
        call = EngineCall(rows=x.shape[0], latent_height=x.shape[2], latent_width=x.shape[3], tokens=context.shape[1])
        mismatches = self.profile.mismatches(call)
        if mismatches:
            raise EngineCannotRun("; ".join(m.message for m in mismatches))

    def run(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
        bound = {}
        for name in self.inputs:
            tensor = named[name].to(self.dtypes[name]).contiguous()
            bound[name] = tensor  # keep alive until the stream is done
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        device = named[SAMPLE].device
        output = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT)), dtype=self.dtypes[OUTPUT], device=device)
        self.context.set_tensor_address(OUTPUT, output.data_ptr())
        stream = torch.cuda.current_stream(device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT engine execution failed")
        stream.synchronize()
        return output


def engine_inputs(runner: EngineRunner, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                  extra: dict[str, Any], blur: tuple[Sequence[int], float] | None) -> dict[str, torch.Tensor]:
    """Named engine inputs for one WebUI UNet call; rows not in ``blur`` get identity matrices."""
    rows, sigma = blur if blur is not None else ((), 0.0)
    named = {SAMPLE: x, TIMESTEP: timesteps.reshape(-1).expand(x.shape[0]), CONTEXT: context}
    named.update({name: value for name, value in extra.items() if name in runner.inputs})
    named.update(blur_matrix_inputs(runner.levels, (x.shape[2], x.shape[3]), x.shape[0], list(rows), sigma,
                                    dtype=torch.float32, device=x.device))
    return named


def make_sd_unet_option(entry_id: str, label: str, checkpoint_name: str, engine_path: Path, profile: EngineProfile,
                        blur_request: BlurRequest, fallback: Fallback):
    """An ``SdUnetOption`` for one registered engine (call inside the WebUI, from ``on_list_unets``).

    ``fallback`` is the original UNet forward bound to the model (for ldm:
    ``lambda *a, **k: sd_hijack.ldm_original_forward(shared.sd_model.model.diffusion_model, *a, **k)``).
    """
    from modules import sd_unet, shared

    warned: set[str] = set()

    def notice(reason: str) -> None:
        if reason not in warned:
            warned.add(reason)
            message = f"SEG TensorRT engine {label} not used for this call, running PyTorch: {reason}"
            logger.warning(message)
            shared.state.textinfo = message

    class SegTrtUnet(sd_unet.SdUnet):
        def __init__(self):
            super().__init__()
            self.runner: EngineRunner | None = None

        def activate(self):
            self.runner = EngineRunner(engine_path, profile)

        def deactivate(self):
            self.runner = None  # frees the engine and its context
            torch.cuda.empty_cache()

        def forward(self, x, timesteps, context, *args, **kwargs):
            try:
                if self.runner is None or args:
                    raise EngineCannotRun("engine not loaded" if self.runner is None else "positional extra inputs")
                self.runner.check(x, context, kwargs)
                named = engine_inputs(self.runner, x, timesteps, context, kwargs, blur_request())
            except EngineCannotRun as reason:
                notice(str(reason))
                return fallback(x, timesteps, context, *args, **kwargs)
            return self.runner.run(named).to(x.dtype)

    class SegTrtUnetOption(sd_unet.SdUnetOption):
        def __init__(self):
            self.label = f"[SEG TRT] {label}"
            self.model_name = checkpoint_name
            self.entry_id = entry_id

        def create_unet(self):
            return SegTrtUnet()

    return SegTrtUnetOption()
