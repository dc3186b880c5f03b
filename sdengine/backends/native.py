"""The native backend: whole requests in the C++ runtime (libsdengine, csrc/).

`sdengine.load(..., backend="native")` gives a Pipeline whose calls run in C++, through
`sdengine._C` (the C API): tokenizer, text encoding, noise, the sampler loop (each step, UNet
on the doubled batch + guidance + sampler update, one cached graph: a CUDA graph on CUDA),
VAE decode and uint8 RGB. The pipeline checks the arguments and builds the result
(GenerationResult, progress bar, callback, cancel) as for every backend; `run_request` does
the rest. The images are those of the Python pipeline for the same seed, sampler and size.

The networks are the AOTInductor engine of the model's architecture (export/aoti.py), found
in the cache or built on first use; it holds no weights, so the modules that Python loaded
hand theirs over without a copy: LoRAs merged into them in place (Pipeline.set_loras, <lora:>
tags) reach the C++ loop and its captured graphs with no reload. `backend="aoti"` drives the
same engine from the Python loop, for what the C++ loop does not run (see `run_request`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..config import ModelConfig
from .aoti import EngineWeights

log = logging.getLogger("sdengine")

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int64: 3}  # sde_dtype
_WHOLE_REQUESTS = ("the native backend runs whole requests in the C++ loop (run_request), not network calls one by "
                   "one; backend='aoti' runs the same compiled networks one call at a time")


class NativeBackend(EngineWeights):
    """Runs whole requests in libsdengine on the model's AOTInductor engine (see the module docstring).

    max_concurrency: requests that may run at once (each on its own compiled-model instance
    and graphs); max_graphs: graphs kept per instance and kind (0: 8; negative: none), as
    sde_model_params."""

    name = "native"
    runs_whole_requests = True  # run_request runs every request; no encode_text / denoise / encode_image

    def __init__(self, config: ModelConfig, text_encoder, unet, vae, text_encoder_2=None, *, engine_dir=None,
                 progress: bool = True, max_concurrency: int = 0, max_graphs: int = 0):
        from ..embeddings import reserve_added_tokens

        # The text encoders' added-token tables exist before the engine takes the weights, so that the
        # C++ loop reads the tables load_embedding writes (no copy).
        reserve_added_tokens({"text_encoder": text_encoder, "text_encoder_2": text_encoder_2})
        super().__init__(config, text_encoder, unet, vae, text_encoder_2, engine_dir=engine_dir, progress=progress)
        self._taught: set = set()  # textual-inversion tokens the C++ tokenizers know
        self._controlnets: dict = {}  # ControlNet path -> sdengine._C.ControlNet
        self._deepcaches: dict = {}  # DeepCache branch -> sdengine._C.DeepCache
        self.has_text_encoder_2 = text_encoder_2 is not None
        self.max_concurrency, self.max_graphs = max_concurrency, max_graphs
        self._native = None
        self._tokenizer_dirs = None
        self._decoder = None  # decode(): the compiled decoder in Python, made on first use

    def native_model(self, tokenizer, tokenizer_2=None):
        """The libsdengine model (sdengine._C.Model) over these weights; made on first call.

        tokenizer (and SDXL's tokenizer_2): the pipeline's sdengine CLIPTokenizers; they are
        written to folders the C++ tokenizer reads (vocabulary, merges, pad token, length)."""
        if self._native is None:
            from sdengine import _C

            if (tokenizer_2 is None) == self.has_text_encoder_2:
                raise ValueError("give tokenizer_2 exactly for SDXL (a second text encoder)")
            self._tokenizer_dirs = tempfile.TemporaryDirectory(prefix="sdengine-tokenizer-")
            folder = tokenizer.save(Path(self._tokenizer_dirs.name) / "tokenizer")
            folder_2 = tokenizer_2.save(Path(self._tokenizer_dirs.name) / "tokenizer_2") if tokenizer_2 else None
            tensors = []
            for name, tensor in {**self._weights, **self._added_token_tables()}.items():
                if tensor.dtype not in _DTYPE_CODES:
                    continue
                tensors.append((name, tensor.data_ptr(), _DTYPE_CODES[tensor.dtype], list(tensor.shape),
                                1 if tensor.device.type == "cuda" else 0, tensor.device.index or 0))
            self._native = _C.Model(tensors, None, json.dumps(self.config.to_dict()), str(self.engine_dir),
                                    str(folder), self.max_concurrency, str(folder_2) if folder_2 else None,
                                    self.max_graphs)
        return self._native

    def _added_token_tables(self) -> dict:
        """The text encoders' added-token tables (textual inversion), by "<component>/<key>", as
        weights of the C++ model: its compiled text encoders then read these tensors in place of
        the engine's own zero tables (buffers.safetensors). The module's table itself where it is
        in the engine's dtype and device; else a converted copy that add_token_embeddings updates."""
        if getattr(self, "_added_tables", None) is None:
            self._added_tables = {}
            for component, module in (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2)):
                table = None if module is None else module.text_model.embeddings._buffers.get("added_tokens")
                if table is not None:
                    self._added_tables[f"{component}/text_model.embeddings.added_tokens"] = (
                        table, table.detach().to(self.device, self.dtype).contiguous())
        return {key: engine_table for key, (_, engine_table) in self._added_tables.items()}

    def add_token_embeddings(self, vectors: dict) -> dict:
        """As EngineWeights', into the modules' added-token tables, which the C++ model reads
        (converted copies refreshed)."""
        ids = super().add_token_embeddings(vectors)
        for table, engine_table in (getattr(self, "_added_tables", None) or {}).values():
            if engine_table.data_ptr() != table.data_ptr():
                engine_table.copy_(table)
        return ids

    def stats(self) -> dict:
        """sde_model_get_stats: what each kind of graph (text, step, decode) has done."""
        if self._native is None:
            raise RuntimeError("the native model is made on the first request")
        return self._native.stats()

    def deepcache_fn(self, branch: int):
        """The C++ DeepCache engine (sdengine._C.DeepCache: sde_deepcache_load on the engine of
        export/aoti_deepcache.py, found in the cache or built on first use) of a branch."""
        if branch not in self._deepcaches:
            self._deepcaches[branch] = self._native.deepcache(branch, str(self.deepcache_engine(branch)))
        return self._deepcaches[branch]

    # -- the Pipeline's hook (docs/CONTRACTS.md): a whole request ------------------------

    def run_request(self, run, tokenizer, tokenizer_2, on_step: Callable) -> np.ndarray:
        """Run a request the pipeline has checked (pipeline.Run); returns uint8 images (N, H, W, 3).

        on_step(step_index, latents or None) after every step (raises to cancel); latents are
        diffusers' latents after the step when the request has a callback (they come to the host
        every step). One C++ request runs one prompt and negative prompt (plain text, or A1111's syntax
        in as many 75-token windows as the batch's longest prompt; textual-inversion tokens included) for images of consecutive seeds
        from one init image and control image:
        images that differ (a batching server's) run as one C++ request per run of consecutive
        images, and on_step then counts each run's steps. Every sampler and schedule of both rules runs;
        ControlNets loaded from files and DeepCache (on its DeepCache engine) run in C++. Anything else is a
        ValueError that says so and names backend="aoti", which runs the same engine from the
        Python loop."""
        r = run.request
        prompts, negatives, seeds, sampler = run.texts, run.negatives, r.seeds, run.plan.sampler
        image, mask, wants_latents = run.image, run.mask, r.callback is not None

        def refuse(what):
            raise ValueError(f"the native backend runs requests in the C++ loop, which has no {what}; "
                             f"backend='aoti' runs the same compiled networks from the Python loop")

        if run.plan.conventions == "a1111" and r.rng == "gpu":
            refuse("rng='gpu' (CUDA's generator); rng='nv' draws the same numbers on any device")
        if r.output_type == "latent":
            refuse("output_type='latent'")
        if r.vae_tiling:
            refuse("tiled VAE decode")
        if r.eta and sampler != "ddim" and run.plan.conventions != "a1111":
            refuse(f"eta for {sampler}")
        if r.hires is not None:
            refuse("hires fix (a second pass on upscaled latents)")
        if r.refiner is not None:
            refuse("refiner handoff (its latents stay inside the C++ loop)")
        if r.ip_adapter_image:
            refuse("IP-Adapter")
        # A1111's syntax: every prompt of the batch takes as many 75-token windows as the longest
        # (the pipeline's _encode), though each C++ request below has one prompt
        windows = 0
        if r.prompt_syntax == "a1111":
            from .. import prompt_syntax

            windows = prompt_syntax.count_windows(tokenizer, list(prompts) + (list(negatives) if run.do_cfg else []))
        # init image (N, 3, H, W) in [-1, 1] and mask (N, 1, H, W) in {0, 1}, at the request's size,
        # as the bytes the C API reads
        init_bytes = [None] * len(seeds) if image is None else [
            ((im.permute(1, 2, 0) + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).numpy().tobytes()
            for im in image]
        mask_bytes = [None] * len(seeds) if mask is None else [
            (m[0] * 255).to(torch.uint8).numpy().tobytes() for m in mask]
        control_images = [self._control_images(run, i) for i in range(len(run.request.controls))]
        # runs of consecutive images that one C++ request makes: same texts and images, seeds + 1 (with A1111's
        # variation seeds: the same seed, subseeds + 1)
        subseeds = list(r.subseeds) if r.subseed_strength else []

        def follows(i):
            if subseeds:
                return seeds[i] == seeds[i - 1] and subseeds[i] == subseeds[i - 1] + 1
            return seeds[i] == seeds[i - 1] + 1

        runs = []
        for i in range(len(seeds)):
            same = runs and prompts[i] == prompts[runs[-1][0]] and negatives[i] == negatives[runs[-1][0]] and \
                follows(i) and init_bytes[i] == init_bytes[i - 1] and mask_bytes[i] == mask_bytes[i - 1] and \
                all(images[i] == images[i - 1] for images in control_images)
            if same:
                runs[-1][1] += 1
            else:
                runs.append([i, 1])

        model = self.native_model(tokenizer, tokenizer_2)
        for token, ids in tokenizer.added_tokens.items():  # textual inversion: teach the C++ tokenizers
            if token not in self._taught:
                model.add_token(token, list(ids), list(tokenizer_2.added_tokens[token]) if tokenizer_2 else [])
                self._taught.add(token)
        deepcache = r.acceleration.deepcache if r.acceleration else None
        if deepcache is not None and r.controls:
            refuse("DeepCache with ControlNets (its DeepCache engine has no ControlNet residuals); "
                   "backend='eager' runs both")
        deepcache_engine = self.deepcache_fn(deepcache.branch) if deepcache is not None else None
        controls = [(self.controlnet_fn(controlnet), images, float(c.scale), float(c.start), float(c.end), bool(c.guess_mode))
                    for c, controlnet, images in zip(r.controls, run.controlnets, control_images)]
        steps_seen = [0]

        def progress(step, total):
            steps_seen[0] = step
            on_step(step - 1, None)
            return True

        def with_latents(step, total, array):
            steps_seen[0] = step
            on_step(step - 1, torch.from_numpy(array))
            return True

        from sdengine import _C

        a1111_rules = run.plan.conventions == "a1111"
        eta = float(run.plan.options.get("eta", 0.0)) if a1111_rules else float(r.eta or 0.0)
        latents_in = None if r.latents is None else r.latents.detach().to("cpu", torch.float32).contiguous().numpy()
        resize = r.seed_resize_from or (0, 0)
        images = []
        for first, count in runs:
            try:
                results = model.generate(
                    prompts[first], negatives[first] if r.negative_prompt_given else None, r.width, r.height, r.steps,
                    float(r.guidance_scale), int(seeds[first]), count, sampler, run.plan.schedule, eta,
                    None if wants_latents else progress, init_bytes[first], r.strength if r.mode != "txt2img" else None,
                    mask_bytes[first], latents=with_latents if wants_latents else None,
                    conventions=run.plan.conventions,
                    latents_in=None if latents_in is None else latents_in[first:first + count],
                    subseed=int(subseeds[first]) if subseeds else 0, subseed_strength=float(r.subseed_strength or 0.0),
                    seed_resize_from_w=int(resize[0]), seed_resize_from_h=int(resize[1]),
                    eta_noise_seed_delta=int(r.eta_noise_seed_delta or 0), rng=r.rng if a1111_rules else "cpu",
                    prompt_syntax="a1111" if r.prompt_syntax == "a1111" else "plain",
                    controls=[(cn, per_image[first], *rest) for cn, per_image, *rest in controls],
                    clip_skip=r.clip_skip or 0, prompt_windows=windows,
                    deepcache_interval=deepcache.interval if deepcache is not None else 0, deepcache=deepcache_engine)
            except _C.Cancelled as e:  # a callback returned False (an exception it raised propagates as itself)
                from ..errors import GenerationCancelled

                raise GenerationCancelled(f"cancelled by the callback at step {steps_seen[0]}") from e
            images += [np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3) for data, w, h, _ in results]
        return np.stack(images)

    def controlnet_fn(self, control):
        """The C++ ControlNet (sdengine._C.ControlNet: sde_controlnet_load on the engine of
        export/aoti_controlnet.py, found in the cache or built on first use) of a ControlNet loaded
        from a file; run_request hands it to the C++ loop with its image, scale, steps and guess
        mode. Before the first request (the pipeline's check) it only checks and builds the engine."""
        controlnet = getattr(control, "controlnet", control)
        path = getattr(controlnet, "path", None)
        if path is None:
            raise ValueError("the native backend runs ControlNets loaded from a file (a path, or "
                             "sdengine.load_controlnet(path)); this one has none: backend='aoti' runs it")
        key = str(path)
        if key not in self._controlnets:
            from sdengine.export import aoti_controlnet

            engine = aoti_controlnet.controlnet_engine_for(self.config, controlnet.config, dtype=self.dtype,
                                                           device=self.device, progress=self._progress)
            if self._native is None:
                return None  # loaded in C++ with the model, on the first request (run_request)
            self._controlnets[key] = self._native.controlnet(key, str(engine))
        return self._controlnets[key]

    @staticmethod
    def _control_images(run, index: int) -> list:
        """The RGB bytes, at the request's size, of control `index` for each image (the bytes the C API reads)."""
        from ..controlnet import prepare_image

        r = run.request
        control = r.controls[index]
        image = prepare_image(control.image, r.width, r.height, r.n_images, 3, control.preprocess,
                              f"control[{index}].image")  # (N, 3, H, W) in [0, 1]
        return [(im.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy().tobytes() for im in image]

    def encode_text(self, input_ids, input_ids_2=None, clip_skip=None):
        raise ValueError(_WHOLE_REQUESTS)

    def denoise(self, x_in, t, context, added_cond=None, controls=()):
        raise ValueError(_WHOLE_REQUESTS)

    def encode_image(self, images):
        raise ValueError(_WHOLE_REQUESTS)

    @torch.inference_mode()
    def decode(self, latents):
        """Unscaled latents -> images (B, 3, H, W) in about [-1, 1], float32, by the compiled
        decoder run from Python: for latents a callback kept (an interrupted request's partial
        result, as a server returns it); requests decode in C++."""
        if self._decoder is None:
            from .aoti import CompiledNetwork, load_package

            info = self.engine["networks"]["vae_decoder"]
            constants = {fqn: self._weights[f"vae/{fqn[len(info['prefix']):]}"] for fqn in info["constants"]
                         if f"vae/{fqn[len(info['prefix']):]}" in self._weights}
            self._decoder = CompiledNetwork("vae_decoder", load_package(self.engine_dir / info["package"], constants),
                                            info.get("static_shape"))
        return self._decoder(latents.to(self.device, self.dtype).contiguous())[0].float()

    # -- the whole request from Python, without the pipeline (tests, tools) -------------

    def generate(self, tokenizer, prompt: str, negative_prompt: Optional[str] = None, *, width: int = 0,
                 height: int = 0, steps: int = 30, guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 1,
                 sampler: Optional[str] = None, schedule: Optional[str] = None, eta: float = 0.0,
                 callback: Optional[Callable[[int, int], Optional[bool]]] = None,
                 init_image: Optional[np.ndarray] = None, strength: Optional[float] = None,
                 mask_image: Optional[np.ndarray] = None, tokenizer_2=None) -> list:
        """One txt2img, img2img (`init_image`) or inpainting (`init_image` + `mask_image`, an
        inpainting model) request straight through the C API. Returns `batch_size` uint8 arrays
        (H, W, 3); image i has seed `seed + i`. callback(step, steps) after each step; False
        cancels (sdengine._C.Cancelled). init_image: uint8 (H, W, 3), the output's size (width
        and height default to it); mask_image: uint8 (H, W), >= 128 repaints; strength in
        [0, 1] (a strength that leaves no step is an error), default 0.8 for img2img and 1.0
        for inpainting. tokenizer_2: SDXL's second tokenizer. Errors: ValueError for bad arguments."""
        from ..request import Request

        # The Python API's rules and words (sdengine.request) before anything reaches C++.
        Request.from_args(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                          guidance_scale=guidance_scale, height=height or None, width=width or None, seed=seed,
                          batch_size=batch_size, sampler=sampler, schedule=schedule, init_image=init_image,
                          strength=strength, mask_image=mask_image, callback=callback, progress=False,
                          eta=eta).for_model(self.config)
        model = self.native_model(tokenizer, tokenizer_2)
        progress = None
        if callback is not None:
            progress = lambda step, total: callback(step, total) is not False  # noqa: E731
        init_bytes = None
        if init_image is not None:
            init_image = np.asarray(init_image)
            if init_image.dtype != np.uint8 or init_image.ndim != 3 or init_image.shape[2] != 3:
                raise ValueError(f"init_image must be a uint8 array (H, W, 3), got {init_image.dtype} "
                                 f"{init_image.shape}")
            height, width = height or init_image.shape[0], width or init_image.shape[1]
            if (height, width) != init_image.shape[:2]:
                raise ValueError(f"init_image is {init_image.shape[1]}x{init_image.shape[0]} but the request is "
                                 f"{width}x{height} (width x height)")
            init_bytes = np.ascontiguousarray(init_image).tobytes()
        mask_bytes = None
        if mask_image is not None:
            mask_image = np.asarray(mask_image)
            if mask_image.ndim == 3 and mask_image.shape[2] == 1:
                mask_image = mask_image[..., 0]
            if mask_image.dtype != np.uint8 or mask_image.shape != (height, width):
                raise ValueError(f"mask_image must be a uint8 array (H, W) = ({height}, {width}), got "
                                 f"{mask_image.dtype} {mask_image.shape}")
            mask_bytes = np.ascontiguousarray(mask_image).tobytes()
        results = model.generate(prompt, negative_prompt, width, height, steps, float(guidance_scale), int(seed),
                                 batch_size, sampler, schedule, float(eta), progress, init_bytes,
                                 None if strength is None else float(strength), mask_bytes)
        return [np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3) for data, w, h, _ in results]
