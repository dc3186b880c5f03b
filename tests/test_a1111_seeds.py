"""A1111's seeds (sdengine/samplers/rng.py): sources, variation seeds, seed resize, ENSD.

The NV source is checked against the output A1111 documents for its Philox port
(modules/rng_philox.py: Generator(seed=0).randn((3, 4))), which is CUDA's torch.randn for seed 0,
and, on a GPU, against CUDA's torch.randn itself.
"""

import numpy as np
import pytest
import torch

import sdengine
from sdengine.samplers import rng

# A1111's documented output of its NV generator for seed 0, shape (3, 4) (CUDA's torch.randn)
A1111_NV_SEED0 = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                  [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                  [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]
SHAPE = (4, 6, 5)


def test_nv_source_is_a1111s_philox():
    np.testing.assert_allclose(rng.PhiloxGenerator(0).randn((3, 4)), A1111_NV_SEED0, rtol=1e-6)


def test_nv_draws_advance_and_depend_on_the_whole_seed():
    g = rng.PhiloxGenerator(2**40 + 7)
    first, second = g.randn((100,)), g.randn((100,))
    assert not np.allclose(first, second)
    assert not np.allclose(first, rng.PhiloxGenerator(7).randn((100,)))  # the high 32 bits count
    assert abs(float(first.mean())) < 0.3 and 0.7 < float(first.std()) < 1.3


@pytest.mark.gpu
def test_nv_source_equals_cuda_randn():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    for seed, shape in [(0, (3, 4)), (123456789, (4, 64, 64)), (2**33 + 5, (4, 96, 128))]:
        g = torch.Generator("cuda").manual_seed(seed)
        want = torch.randn(shape, generator=g, device="cuda").cpu().numpy()
        np.testing.assert_allclose(rng.PhiloxGenerator(seed).randn(shape), want, rtol=1e-5, atol=1e-6)


def test_cpu_source_is_torchs_cpu_generator():
    noise = rng.ImageNoise(SHAPE, [5, 9])
    g5, g9 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(9)
    assert torch.equal(noise.first(), torch.stack([torch.randn(SHAPE, generator=g5), torch.randn(SHAPE, generator=g9)]))
    assert torch.equal(noise.next(), torch.stack([torch.randn(SHAPE, generator=g5), torch.randn(SHAPE, generator=g9)]))


def test_gpu_source_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="rng='nv' draws the same numbers"):
        rng.ImageNoise(SHAPE, [1], source="gpu")


def test_ensd_restarts_the_later_draws_from_seed_plus_delta():
    noise = rng.ImageNoise(SHAPE, [5], eta_noise_seed_delta=31337)
    start = noise.first()
    assert torch.equal(start[0], torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(noise.next()[0], torch.randn(SHAPE, generator=torch.Generator().manual_seed(5 + 31337)))


def test_variation_seed_is_a1111s_slerp():
    strength = 0.3
    noise = rng.ImageNoise(SHAPE, [5], subseeds=[77], subseed_strength=strength).first()[0]
    a = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    b = torch.randn(SHAPE, generator=torch.Generator().manual_seed(77))
    # spherical interpolation over dim 1 (A1111's slerp), written out here with float64 angles
    an, bn = a.double() / a.double().norm(dim=1, keepdim=True), b.double() / b.double().norm(dim=1, keepdim=True)
    omega = torch.acos((an * bn).sum(1))
    want = (torch.sin((1 - strength) * omega) / torch.sin(omega)).unsqueeze(1) * a.double() + \
        (torch.sin(strength * omega) / torch.sin(omega)).unsqueeze(1) * b.double()
    assert torch.allclose(noise.double(), want, atol=1e-5)
    assert torch.equal(rng.ImageNoise(SHAPE, [5], subseeds=[77], subseed_strength=0.0).first()[0], a)


def test_seed_resize_pastes_the_seeds_noise_centred():
    """Resize from 24x16 (3x2 cells) into 40x48 (5x6): the 2x3 draw sits at rows 2..4, cols 1..4."""
    shape = (4, 6, 5)
    got = rng.ImageNoise(shape, [5], seed_resize_from=(24, 16)).first()[0]
    small = torch.randn((4, 2, 3), generator=torch.Generator().manual_seed(5))
    canvas = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    canvas[:, 2:4, 1:4] = small
    assert torch.equal(got, canvas)
    bigger = rng.ImageNoise((4, 2, 3), [5], seed_resize_from=(40, 48)).first()[0]  # cropped when larger
    assert torch.equal(bigger, canvas_crop := torch.randn(shape, generator=torch.Generator().manual_seed(5))[:, 2:4, 1:4])
    assert canvas_crop.shape == (4, 2, 3)


def test_request_gives_every_image_the_seed_with_variation_seeds():
    r = sdengine.Request.from_args("x", batch_size=3, seed=10, subseed=50, subseed_strength=0.5)
    assert r.seeds == (10, 10, 10) and r.subseeds == (50, 51, 52)
    r = sdengine.Request.from_args("x", batch_size=2, seed=10)
    assert r.seeds == (10, 11) and r.subseeds == ()


@pytest.mark.parametrize("kwargs,parameter", [(dict(rng="cuda"), "rng"), (dict(subseed_strength=1.5), "subseed_strength"),
                                              (dict(seed_resize_from_w=3, seed_resize_from_h=64), "seed_resize_from_w"),
                                              (dict(eta_noise_seed_delta=-1), "eta_noise_seed_delta"),
                                              (dict(conventions="comfy"), "conventions")])
def test_bad_seed_options_are_named(kwargs, parameter):
    with pytest.raises(sdengine.InvalidArgumentError) as e:
        sdengine.Request.from_args("x", **kwargs)
    assert e.value.parameter == parameter
