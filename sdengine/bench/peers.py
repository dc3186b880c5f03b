"""The CPU peers of the benchmark: the engines users pick instead of ours, as runner kinds.

    sdengine bench --device cpu --backends diffusers@fp32,diffusers@bf16,optimum-openvino,sdcpp,compile \\
        --peer-python optimum-openvino=/work/venvs/peers/bin/python --peer-python sdcpp=/work/venvs/peers/bin/python

Each peer is built from the benchmark's weights folder (the same random weights as every
other row), in its own process like every row, and may run under another interpreter
(`--peer-python`): the environment its users install (benchmarks/README.md, "Peers"). A peer
whose package is missing is a row skipped with the install command.

- `optimum-openvino`: optimum-intel's OVStableDiffusionPipeline, exported from the weights
  folder once (cached beside the weights), reshaped static to the workload and compiled by
  OpenVINO with its default precision (bf16 where the CPU has bf16 dot products), or
  `@f32` / `@bf16`. Its first-call cost (export or read, reshape, compile, one short run) is
  its prepare time. Its exported UNet takes an int64 timestep (optimum-intel's export), so the
  fractional timesteps of Euler-type schedulers are truncated: its images differ from diffusers'
  more than its precision alone explains (on the tiny random weights, f32: 0.07 mean absolute
  error against diffusers in its own venv), which the fidelity MAE of its row shows.
- `sdcpp`: stable-diffusion.cpp through stable-diffusion-cpp-python, on a single-file LDM copy
  of the weights (written once, beside them); `@f16` / `@q8_0` / `@q4_0` convert the weights on
  load (ggml's weight types), `@f32` (the default) keeps them. It exposes whole generations
  only: its rows are end to end.

Every runner answers the calls of sdengine/bench/runners.py (the components it cannot run raise
BackendUnavailable, recorded as skipped with that reason).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sdengine.bench.runners import BackendUnavailable, DiffusersRunner, PEER_INSTALL as INSTALL, Workload
from sdengine.config import ModelConfig

def peer_cache(source: str, name: str) -> Path:
    """Where a peer's conversion of the weights folder is kept: beside the weights, so that it is
    made once per set of weights and removed with them."""
    return Path(source) / "_peers" / name


def _build_once(target: Path, build) -> float:
    """build(tmp) into a temporary folder beside target, renamed into place (never half a
    conversion); nothing when target exists. Returns the seconds spent (0 when cached)."""
    if target.exists():
        return 0.0
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    started = time.perf_counter()
    try:
        build(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return time.perf_counter() - started


def _cpu_only(name: str, device: torch.device, workload: Workload):
    if device.type != "cpu":
        raise BackendUnavailable(f"{name} is a CPU peer (run with --device cpu)")
    if workload.controlnets:
        raise BackendUnavailable(f"the {name} row runs no ControlNets")
    if workload.hires_scale or workload.ip_adapters:
        raise BackendUnavailable(f"the {name} row runs no hires fix and no IP-Adapters")


def _import(name: str, module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailable(f"missing package: {e} ({INSTALL[name]})") from None


# ---------------------------------------------------------------------------
# optimum-intel / OpenVINO
# ---------------------------------------------------------------------------

class OptimumOpenVINORunner(DiffusersRunner):
    """OVStableDiffusionPipeline (optimum-intel), static shapes, OpenVINO's default precision. Its
    __call__ is diffusers' StableDiffusionPipeline's: a torch generator gives it the same initial
    noise as the diffusers rows (and sdengine's) for a seed."""

    name = "optimum-openvino"

    def __init__(self, source: str, config: ModelConfig, workload: Workload, device: torch.device, *,
                 variant: Optional[str] = None, threads: Optional[int] = None):
        _cpu_only(self.name, device, workload)
        if config.text_encoder_2 is not None:
            raise BackendUnavailable("the optimum-openvino row runs SD1/SD2 pipelines (OVStableDiffusionPipeline)")
        self.optimum = _import(self.name, "optimum.intel")
        self.source, self.config, self.workload, self.device = source, config, workload, device
        self.variant, self.threads = variant, threads
        self.unet_calls: Optional[int] = None
        # what DiffusersRunner's end_to_end and image read: no ControlNets, IP-Adapters or hires pass (_cpu_only)
        self.no_scheduler, self.controlnets, self.control_images, self.ip_adapter_images = None, [], [], []
        self.second_pass = None

    def prepare(self) -> dict:
        w = self.workload
        cls = self.optimum.OVStableDiffusionPipeline
        export_dir = peer_cache(self.source, f"{self.name}-{_version('optimum-intel')}")
        export_s = _build_once(export_dir, lambda tmp: cls.from_pretrained(self.source, export=True, compile=False)
                               .save_pretrained(tmp))
        started = time.perf_counter()
        ov_config = {"INFERENCE_NUM_THREADS": str(self.threads or torch.get_num_threads()), "NUM_STREAMS": "1",
                     "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": str(export_dir / "model_cache")}
        if self.variant is not None:
            ov_config["INFERENCE_PRECISION_HINT"] = self.variant
        self.pipe = cls.from_pretrained(export_dir, compile=False, ov_config=ov_config)
        self.pipe.reshape(batch_size=w.batch, height=w.height, width=w.width, num_images_per_prompt=1)
        self.pipe.set_progress_bar_config(disable=True)
        from sdengine.bench.reference import scheduler_for_sampler

        self.pipe.scheduler = scheduler_for_sampler(w.sampler, w.schedule, self.pipe.scheduler.config)
        self.pipe.compile()
        compile_s = time.perf_counter() - started
        self.pipe(prompt=[""] * w.batch, num_inference_steps=2, guidance_scale=w.guidance_scale, height=w.height,
                  width=w.width, output_type="np")
        precision = str(self.pipe.unet.request.get_property("INFERENCE_PRECISION_HINT"))
        return {"export_s": round(export_s, 3), "export_cached": export_s == 0.0, "compile_s": round(compile_s, 3),
                "inference_precision": precision, "openvino": _version("openvino"),
                "optimum_intel": _version("optimum-intel"), "transformers": _version("transformers"),
                "diffusers": _version("diffusers")}

    def text_encoder(self, inputs):
        ids = inputs["input_ids"].numpy()  # OpenVINO takes numpy arrays (float32 for the float inputs)
        half = ids.shape[0] // 2  # compiled for the prompt batch: the pipeline encodes each half on its own
        return [self.pipe.text_encoder(ids[:half])[0], self.pipe.text_encoder(ids[half:])[0]]

    def unet_step(self, inputs):
        from sdengine.bench.runners import guidance

        out = self.pipe.unet(sample=_f32(inputs["x"]), timestep=_f32(inputs["t"].reshape(1)),
                             encoder_hidden_states=_f32(inputs["context"]))[0]
        return guidance(torch.from_numpy(np.asarray(out)), self.workload.guidance_scale)

    def vae_decode(self, inputs):
        return self.pipe.vae_decoder(latent_sample=_f32(inputs["latents"]))[0]

    # end_to_end, image, ran, close: DiffusersRunner's (its __call__ is diffusers' pipeline's)


# ---------------------------------------------------------------------------
# stable-diffusion.cpp
# ---------------------------------------------------------------------------

class SDCppRunner:
    """stable-diffusion.cpp (stable-diffusion-cpp-python) on a single-file copy of the weights."""

    name = "sdcpp"

    def __init__(self, source: str, config: ModelConfig, workload: Workload, device: torch.device, *,
                 variant: Optional[str] = None, threads: Optional[int] = None):
        _cpu_only(self.name, device, workload)
        self.sdcpp = _import(self.name, "stable_diffusion_cpp")
        if workload.sampler not in ("euler", "euler_a", "heun", "dpm_2", "dpmpp_2m", "lcm"):
            raise BackendUnavailable(f"stable-diffusion.cpp has no sampler {workload.sampler!r} here")
        self.source, self.config, self.workload = source, config, workload
        self.variant, self.threads = variant, threads
        self.unet_calls: Optional[int] = None

    def prepare(self) -> dict:
        single = peer_cache(self.source, "single-file")
        convert_s = _build_once(single, self._write_single_file)
        started = time.perf_counter()
        kwargs = {"model_path": str(single / "model.safetensors"), "n_threads": self.threads or torch.get_num_threads(),
                  "verbose": False}
        if self.variant is not None:
            kwargs["wtype"] = self.variant
        self.sd = self.sdcpp.StableDiffusion(**kwargs)
        load_s = time.perf_counter() - started
        self._generate("", 0, steps=2)
        return {"single_file_s": round(convert_s, 3), "load_s": round(load_s, 3), "wtype": self.variant or "f32",
                "stable_diffusion_cpp_python": _version("stable-diffusion-cpp-python")}

    def _write_single_file(self, folder: Path):
        """The weights folder as one LDM / A1111 .safetensors file (float32), what sd.cpp reads."""
        import sdengine
        from sdengine.single_file import save_single_file

        pipe = sdengine.load(self.source, device="cpu", dtype="fp32", backend="eager")
        backend = pipe.backend
        from sdengine.loading import LoadedModel

        loaded = LoadedModel(config=backend.config, text_encoder=backend.text_encoder, text_encoder_2=None,
                             unet=backend.unet, vae=backend.vae, tokenizer=None, tokenizer_2=None, source="bench",
                             name="bench")
        save_single_file(loaded, folder / "model.safetensors")
        (folder / "source.json").write_text(json.dumps({"from": str(self.source)}))

    def _generate(self, prompt: str, seed: int, steps: Optional[int] = None):
        w = self.workload
        sample_method = {"euler": "euler", "euler_a": "euler_a", "heun": "heun", "dpm_2": "dpm2",
                         "dpmpp_2m": "dpm++2m", "lcm": "lcm"}[w.sampler]
        images = self.sd.generate_image(prompt=prompt, negative_prompt="", width=w.width, height=w.height,
                                        cfg_scale=w.guidance_scale, sample_steps=steps or w.steps, seed=seed,
                                        sample_method=sample_method, batch_count=w.batch)
        self.unet_calls = steps or w.steps
        return images

    def _whole_only(self, *_):
        raise BackendUnavailable("stable-diffusion.cpp runs whole generations: end to end only")

    text_encoder = unet_step = vae_decode = _whole_only

    def end_to_end(self, inputs):
        return self._generate(inputs["prompts"][0], inputs["seed"])

    def image(self, prompt: str, seed: int):
        return np.asarray(self._generate(prompt, seed)[0].convert("RGB"), dtype=np.float32) / 255

    def ran(self) -> dict:
        return {"sampler": self.workload.sampler}

    def close(self):
        self.sd = None


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy()


def _version(package: str) -> Optional[str]:
    from sdengine.bench.measure import package_version

    return package_version(package)
