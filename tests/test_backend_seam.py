"""The backend seam (sdengine/backends/base.py): adding a backend is one module and one registry
line. A toy backend written here, outside sdengine (a wrapper around eager that counts its
calls), is registered and then runs through sdengine.load, from_diffusers and the CLI: the same
images as eager, and every network call went through it."""

import numpy as np
import pytest
from PIL import Image

import sdengine
from sdengine.backends import base
from sdengine.backends.eager import EagerBackend
from sdengine.cli import main
from support.tiny import save_tiny_pipeline, tiny_pipeline

KWARGS = dict(steps=3, height=16, width=24, seed=5, batch_size=2, sampler="euler", output_type="np", progress=False,
              guidance_scale=5.0)


class ToyBackend(base.BaseBackend):
    """The eager backend behind a wrapper that counts each network call (a backend module of its own)."""

    name = "toy"

    @classmethod
    def from_loaded(cls, loaded, *, label: str = "toy"):
        return cls(EagerBackend.from_loaded(loaded), label)

    def __init__(self, eager: EagerBackend, label: str):
        self.eager, self.label, self.calls = eager, label, {}
        self.config, self.device, self.dtype = eager.config, eager.device, eager.dtype

    def _counted(self, name: str):
        self.calls[name] = self.calls.get(name, 0) + 1
        return getattr(self.eager, name)

    def encode_text(self, input_ids, input_ids_2=None, clip_skip=None):
        return self._counted("encode_text")(input_ids, input_ids_2, clip_skip=clip_skip)

    def denoise(self, x_in, t, context, added_cond=None, controls=()):
        return self._counted("denoise")(x_in, t, context, added_cond, controls=controls)

    def encode_image(self, images):
        return self._counted("encode_image")(images)

    def decode(self, latents):
        return self._counted("decode")(latents)

    def controlnet_fn(self, control):
        return self._counted("controlnet_fn")(control)

    def weight_views(self) -> dict:
        return self._counted("weight_views")()

    def add_token_embeddings(self, vectors: dict) -> dict:
        return self._counted("add_token_embeddings")(vectors)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(base.REGISTRY, "toy", ToyBackend)  # base.register("toy", ToyBackend), undone after
    return ToyBackend


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("models") / "tiny-sd15")


def test_the_registered_backends_implement_the_seam():
    for name in ("eager", "graph", "triton", "compile", "native", "aoti", "onnx", "openvino"):
        assert name in base.names()
    for name in ("eager", "graph", "triton", "compile", "aoti", "native", "openvino"):
        cls = base.get(name)
        missing = [member for member in ("load_model", "from_loaded", "prepare", "run_request", "encode_text",
                                         "denoise", "encode_image", "decode", "fused_step", "controlnet_fn",
                                         "weight_views", "add_token_embeddings", "release_memory",
                                         "weights_changed", "max_prompt_windows", "runs_whole_requests", "name",
                                         "cpu_bf16")
                   if not hasattr(cls, member)]
        assert not missing, f"{name}: {missing}"
    with pytest.raises(ValueError, match="backend must be one of eager, graph"):
        base.get("tensorrt")


def test_a_registered_toy_backend_runs_the_pipeline(toy, tiny_folder):
    pipe = sdengine.load(tiny_folder, device="cpu", backend="toy", backend_options={"label": "mine"})
    assert isinstance(pipe.backend, toy) and pipe.backend.label == "mine"
    assert isinstance(pipe.backend, base.Backend)  # every member of the Protocol is there
    images = pipe("a red cube", **KWARGS).images
    reference = sdengine.load(tiny_folder, device="cpu", backend="eager")("a red cube", **KWARGS).images
    assert images.shape == (2, 16, 24, 3) and np.array_equal(images, reference)
    # guidance: one text encoding per side, one UNet call per step, one decode
    assert pipe.backend.calls == {"encode_text": 2, "denoise": 3, "decode": 1}
    with pytest.raises(ValueError, match="backend_options: colour not accepted by backend 'toy'"):
        sdengine.load(tiny_folder, device="cpu", backend="toy", backend_options={"colour": "red"})


def test_a_registered_toy_backend_runs_img2img_from_diffusers(toy):
    source = tiny_pipeline("sd15")
    pipe = sdengine.from_diffusers(source, backend="toy")
    init = np.random.default_rng(0).random((16, 24, 3)).astype(np.float32)
    kwargs = dict(KWARGS, init_image=init, strength=0.7)
    images = pipe("a red cube", **kwargs).images
    reference = sdengine.from_diffusers(source, backend="eager")("a red cube", **kwargs).images
    assert np.array_equal(images, reference)
    assert pipe.backend.calls["encode_image"] == 2  # one posterior sample per image


def test_the_cli_offers_a_registered_backend(toy, tiny_folder, tmp_path):
    out = tmp_path / "toy.png"
    assert main(["generate", "a cat", "--model", str(tiny_folder), "--backend", "toy", "--steps", "2",
                 "--height", "16", "--width", "16", "--seed", "3", "-o", str(out), "--no-progress"]) == 0
    eager = tmp_path / "eager.png"
    assert main(["generate", "a cat", "--model", str(tiny_folder), "--backend", "eager", "--steps", "2",
                 "--height", "16", "--width", "16", "--seed", "3", "-o", str(eager), "--no-progress"]) == 0
    assert Image.open(out).tobytes() == Image.open(eager).tobytes()
