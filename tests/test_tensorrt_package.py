"""The TensorRT wheel offered for install matches the CUDA build of torch, or none is offered, with why."""

from __future__ import annotations

import pytest
from packaging.requirements import Requirement

from seg_tsam.export.tensorrt_package import tensorrt_offer


@pytest.mark.parametrize("cuda, major", [("12.1", "12"), ("12.8", "12"), ("13.0", "13")])
def test_the_wheel_is_built_for_torchs_cuda_major(cuda, major):
    offer = tensorrt_offer(cuda, cuda_device=True)
    requirement = Requirement(offer.requirement)
    assert requirement.name == f"tensorrt-cu{major}"
    (pin,) = requirement.specifier
    assert pin.operator == "==" and int(pin.version.split(".")[0]) in (10, 11)  # the majors the builder supports
    assert f"CUDA {cuda}" in offer.reason


@pytest.mark.parametrize("cuda, device, why", [
    (None, True, "not a CUDA build"),
    ("", False, "not a CUDA build"),
    ("12.1", False, "no CUDA GPU"),
    ("11.8", True, "CUDA 11.8"),
])
def test_no_wheel_where_none_fits_and_the_reason_says_why(cuda, device, why):
    offer = tensorrt_offer(cuda, cuda_device=device)
    assert offer.requirement is None and why in offer.reason
