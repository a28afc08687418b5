"""Which TensorRT wheel the Export tab offers to install: the one built for the CUDA major version
of the WebUI's torch.

TensorRT's pip wheels come per CUDA major (``tensorrt-cu12``, ``tensorrt-cu13``; the bare
``tensorrt`` means CUDA 13). Their ``-libs`` part is a stub that downloads the real libraries
(1.3-2.5 GB) from pypi.nvidia.com at install time. The pins are versions this extension is
written for: TensorRT 10 for CUDA 12 (NVIDIA driver r535 or newer), TensorRT 11 for CUDA 13
(r580 or newer). Nothing here imports torch or tensorrt.
"""

from __future__ import annotations

from dataclasses import dataclass

#: CUDA major version of torch's build → the pinned TensorRT requirement offered for it.
TENSORRT_FOR_CUDA = {"12": "tensorrt-cu12==10.13.3.9", "13": "tensorrt-cu13==11.4.0.106"}


@dataclass(frozen=True)
class TensorRTOffer:
    requirement: str | None  #: the pip requirement to install, ``None`` when none fits this machine
    reason: str  #: what the tab says: what the requirement is for, or why there is none


def tensorrt_offer(torch_cuda_version: str | None, cuda_device: bool) -> TensorRTOffer:
    """The TensorRT wheel for torch built against CUDA ``torch_cuda_version`` (``torch.version.cuda``;
    ``None`` for a CPU or ROCm build) on a machine with (``cuda_device``) or without a CUDA GPU."""
    if not torch_cuda_version:
        return TensorRTOffer(None, "the WebUI's torch is not a CUDA build, and TensorRT needs CUDA")
    if not cuda_device:
        return TensorRTOffer(None, "no CUDA GPU is available to this WebUI, and TensorRT needs one")
    major = torch_cuda_version.split(".")[0]
    requirement = TENSORRT_FOR_CUDA.get(major)
    if requirement is None:
        supported = ", ".join(f"CUDA {version}" for version in TENSORRT_FOR_CUDA)
        return TensorRTOffer(None, f"the WebUI's torch is built for CUDA {torch_cuda_version}; the TensorRT "
                                   f"wheels offered here are for {supported}")
    return TensorRTOffer(requirement, f"`{requirement}` matches the WebUI's torch (CUDA {torch_cuda_version}); "
                                      "it downloads about 2 GB from pypi.nvidia.com")
