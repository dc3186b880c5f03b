"""int8 quantization of the UNet (compile backend, quantize="int8": sdengine/quantize.py) against
fp32 on the same weights: PyTorch's PT2E flow with Inductor's x86 recipe, gated by fidelity.

References: the eager backend in fp32 on the same tiny random weights (image error), and the
demo model's digits read by the classifier of tests/test_demo.py (its accuracy in int8 against
fp32). Budget: a few minutes on 2 CPU cores (export, calibration and lowering per shape).
"""

import copy

import numpy as np
import pytest
import torch

import sdengine
from support.tiny import tiny_pipeline

# CI runs this file on its own with torchao on the path (.ci/run: diffusers imports torchao at import
# when it is installed, which would slow every other test's process)
pytest.importorskip("torchao", reason="PT2E lives in torchao: pip install 'sdengine[int8]'")
pytestmark = pytest.mark.slow

KWARGS = dict(steps=4, height=32, width=32, seed=[1, 2], output_type="np", progress=False)


def test_int8_unet_stays_close_to_fp32():
    pipe = tiny_pipeline("sd15")
    eager = sdengine.from_diffusers(copy.deepcopy(pipe))
    int8 = sdengine.from_diffusers(copy.deepcopy(pipe), backend="compile", backend_options={"quantize": "int8"})
    got, want = int8(["a cat", "a dog"], **KWARGS).images, eager(["a cat", "a dog"], **KWARGS).images
    # 0.031 measured on these random tiny weights (max 0.24): above the 0.02 that bf16 meets, which is
    # why int8 is opt-in; the bound catches a broken calibration or lowering (those give ~0.2)
    assert np.abs(got - want).mean() <= 0.05
    assert len(int8.backend.unet_fn.by_shape) == 1  # quantized once, at the workload's shape


def test_int8_demo_digits_read_as_in_fp32():
    from test_demo import accuracy, fit_classifier, generate_digits

    classifier = fit_classifier()[0]
    fp32 = sdengine.load(device="cpu", dtype="fp32")
    int8 = sdengine.load(device="cpu", dtype="fp32", backend="compile", backend_options={"quantize": "int8"})
    images, labels = generate_digits(fp32)
    int8_images, _ = generate_digits(int8)
    assert accuracy(classifier, int8_images, labels) >= accuracy(classifier, images, labels) - 0.05


def test_int8_refuses_what_it_does_not_quantize():
    with pytest.raises(ValueError, match="dtype='fp32'"):
        sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")).to(torch.bfloat16), backend="compile",
                                backend_options={"quantize": "int8"})
    with pytest.raises(ValueError, match="SDXL"):
        sdengine.from_diffusers(tiny_pipeline("sdxl"), backend="compile", backend_options={"quantize": "int8"})
    with pytest.raises(ValueError, match="quantize must be"):
        sdengine.from_diffusers(tiny_pipeline("sd15"), backend="compile", backend_options={"quantize": "int4"})
