"""The aoti backend: the native runtime's compiled networks, driven step by step from Python.

The AOTInductor engine (export/aoti.py) is found in the cache or built on first use; it holds
no weights, so the modules that Python loaded hand theirs over without a copy (the tensors
already have the engine's dtype, device and layout). The pipeline then runs its own loop and
calls the compiled packages through the backend interface of docs/CONTRACTS.md (encode_text,
denoise, encode_image, decode), one call at a time.

This is the same engine as `backend="native"`, which runs whole requests in the C++ loop
(libsdengine) instead; this backend serves what that loop does not (any sampler, explicit
latents, per-image prompts) and times the compiled networks one by one.

Not compiled (run eagerly, from the same weights): prompts with textual-inversion tokens (the
engine's token table has the checkpoint's vocabulary only). clip_skip is an input of the
compiled text encoders.
The engine reads the modules' own tensors, so LoRAs merged into them in place (`weight_views`)
reach the engine with no reload. Its UNet takes contexts of 1 to engine.json's
max_prompt_windows 77-token windows (A1111-syntax prompts of up to 32 x 75 tokens).
ControlNets run through ControlNet engines (export/aoti_controlnet.py) and DeepCache through
DeepCache engines (export/aoti_deepcache.py: the UNet as DeepCache's full and cached step).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..config import ModelConfig
from .base import BaseBackend
from .eager import run_text_encoders

log = logging.getLogger("sdengine")


def load_package(path: Path, constants: dict):
    """A compiled package with its weights handed over (user-managed: no copy)."""
    package = torch._inductor.aoti_load_package(str(path))
    wanted = set(package.get_constant_fqns())
    constants = {k: v for k, v in constants.items() if k in wanted}
    missing = sorted(wanted - set(constants))
    if missing:
        raise ValueError(f"{path}: the weights lack {len(missing)} constants the engine needs, e.g. {missing[0]!r}")
    try:
        package.load_constants(constants, check_full_update=True, user_managed=True)
    except TypeError:  # an older torch without user-managed constants: they are copied
        package.load_constants(constants, check_full_update=True)
    return package


class CompiledNetwork:
    """One compiled package. A network built with static shapes (engine.json `static_shape`:
    its dynamic compile failed, export/aoti.py ATTEMPTS) runs that shape only: a batch-1 one
    runs row by row, other shapes are a ValueError naming the network."""

    def __init__(self, name: str, package, static_shape=None):
        self.name, self.package = name, package
        self.static_shape = tuple(static_shape) if static_shape else None

    def __call__(self, *inputs) -> list:
        outputs = self._run(inputs)
        return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]

    def _run(self, inputs):
        shape = tuple(inputs[0].shape)
        if self.static_shape is None or shape == self.static_shape:
            return self.package(*inputs)
        if self.static_shape[0] != 1 or (1,) + shape[1:] != self.static_shape:
            raise ValueError(f"the {self.name} network of this engine runs inputs of shape {self.static_shape} only "
                             f"(it was compiled with static shapes after its dynamic compile failed: engine.json "
                             f"networks.{self.name}.attempts), not {shape}")
        rows = [self(*(t[i:i + 1].contiguous() for t in inputs)) for i in range(shape[0])]
        return [torch.cat(parts) for parts in zip(*rows)]


def _timesteps(t, batch: int, device) -> torch.Tensor:
    """(batch,) float32 timesteps on device, from a scalar or (B,) tensor (one step: all equal)."""
    return torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1).expand(batch).contiguous()


def engine_weights(modules: dict, device, dtype) -> dict:
    """The weights each network reads, by "<component>/<key>", in the engine's dtype (floating
    ones) and on its device (no copy for weights that already are)."""
    weights = {}
    for component, module in modules.items():
        if module is None:
            continue
        for key, tensor in module.state_dict().items():
            weights[f"{component}/{key}"] = tensor.detach().to(
                device, dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
    return weights


def engine_buffers(engine_dir: Path, device, dtype) -> dict:
    """The engine's own constants (buffers.safetensors: the text encoders' added-token tables),
    by "<network>/<fqn>", on the device, floating ones in the engine's dtype."""
    path = Path(engine_dir) / "buffers.safetensors"
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    return {k: v.to(device, dtype if v.is_floating_point() else v.dtype).contiguous()
            for k, v in load_file(str(path)).items()}


class EngineWeights(BaseBackend):
    """What the aoti and native backends share: the model's AOTInductor engine (found in the
    cache or built on first use, export/aoti.py), reading the modules' own tensors
    (`self._weights`, made by engine_weights without a copy where dtype and device fit), so
    LoRAs merged into them in place (sdengine/lora.py) reach the compiled networks with no
    reload."""

    max_prompt_windows = 1  # 77-token windows the engine's UNet takes: engine.json's, read in __init__
    cpu_bf16 = False  # its CPU engines are built in fp32 unless asked: fp32 is its CPU default (sdengine.load)

    def __init__(self, config: ModelConfig, text_encoder, unet, vae, text_encoder_2=None, *, engine_dir=None,
                 progress: bool = True):
        from sdengine.export import aoti

        aoti.check_supported(config)
        self.config = config
        self.text_encoder, self.unet, self.vae = text_encoder.eval(), unet.eval(), vae.eval()
        self.text_encoder_2 = text_encoder_2.eval() if text_encoder_2 is not None else None
        first = next(unet.parameters())
        self.device, self.dtype = first.device, first.dtype
        if engine_dir is None:
            engine_dir = aoti.engine_for(config, dtype=self.dtype, device=self.device, progress=progress)
        self._progress = progress
        self.engine_dir = Path(engine_dir)
        self.engine = json.loads((self.engine_dir / "engine.json").read_text())
        self.max_prompt_windows = self.engine["max_prompt_windows"]
        # The engine reads these tensors in place: they must live as long as it does.
        self._weights = engine_weights({"text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
                                        "unet": unet, "vae": vae}, self.device, self.dtype)

    def weight_views(self) -> dict:
        """As EagerBackend.weight_views: the modules' tensors, which the engine reads (no copy)."""
        from ..lora import parameter_views

        views = parameter_views({"unet": self.unet, "text_encoder": self.text_encoder,
                                 "text_encoder_2": self.text_encoder_2})
        for component, named in views.items():
            for key, tensor in named.items():
                engine_tensor = self._weights.get(f"{component}/{key}")
                if engine_tensor is not None and engine_tensor.data_ptr() != tensor.data_ptr():
                    raise ValueError(f"the {self.name} engine reads a copy of {component}/{key} ({engine_tensor.dtype} "
                                     f"on {engine_tensor.device}), not the module's tensor: load the model in the "
                                     "engine's dtype and device to change its weights")
        return views

    def add_token_embeddings(self, vectors: dict) -> dict:
        """As EagerBackend.add_token_embeddings, into the modules' added-token tables (the aoti
        backend's prompts with those ids run the eager text encoders)."""
        from ..embeddings import reserve_added_tokens, write_added_tokens

        encoders = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        reserve_added_tokens(encoders)
        return write_added_tokens(encoders, vectors)

    def prepare(self, height: int, width: int, batch_size: int = 1, sampler=None, schedule=None, *,
                ip_tokens: tuple = ()) -> dict:
        """Pipeline.prepare's backend part: the engine is built (or found) when the backend is
        made, so nothing is compiled here; the warm-up generation then captures the graphs
        (native). Returns the engine's folder and build time, for the benchmark record."""
        return {"engine": str(self.engine_dir), "engine_build_s": self.engine.get("build_s")}

    def check_acceleration(self, acceleration) -> None:
        """DeepCache runs on a DeepCache engine of its branch (export/aoti_deepcache.py: the UNet as
        its full and its cached step); T-GATE and ToMe do not (the compiled UNet has no phases)."""
        others = [name for name in acceleration.names() if name != "deepcache"]
        if others:
            raise ValueError(f"{others[0]}: backend {self.name!r} runs deepcache (on its DeepCache engine), not "
                             f"{', '.join(others)}; use backend='eager', 'graph', 'triton' or 'compile'")

    def deepcache_engine(self, branch: int) -> Path:
        """The DeepCache engine of a branch for this model's architecture (found in the cache or
        built on first use)."""
        engines = self.__dict__.setdefault("_deepcache_engines", {})
        if branch not in engines:
            from sdengine.export import aoti_deepcache

            engines[branch] = aoti_deepcache.deepcache_engine_for(self.config, branch, dtype=self.dtype,
                                                                  device=self.device, progress=self._progress)
        return engines[branch]

    def controlnet_fn(self, control):
        """ControlNets run through a ControlNet engine from Python (AOTIBackend); the C++ loop of
        the native backend does not take them from Python: a ValueError before any work."""
        raise ValueError(f"the {self.name} backend does not run ControlNets from Python; backend='aoti' runs them "
                         "through the compiled ControlNet engine (and the C API through sde_controlnet_load)")

    def engine_vocab_size(self) -> int:
        """Token ids the engine's text encoder embeds (the checkpoint's vocabulary)."""
        return self._weights["text_encoder/text_model.embeddings.token_embedding.weight"].shape[0]


class AOTIBackend(EngineWeights):
    """Runs the AOTInductor engine of the model's architecture from Python (see the module docstring)."""

    name = "aoti"

    def __init__(self, config: ModelConfig, text_encoder, unet, vae, text_encoder_2=None, *, engine_dir=None,
                 progress: bool = True):
        super().__init__(config, text_encoder, unet, vae, text_encoder_2, engine_dir=engine_dir, progress=progress)
        self._buffers = engine_buffers(self.engine_dir, self.device, self.dtype)
        self._networks = {}

    def _network(self, name: str) -> CompiledNetwork:
        if name not in self._networks:
            info = self.engine["networks"][name]
            prefix, component = info["prefix"], info["component"]
            constants = {}
            for fqn in info["constants"]:
                tensor = self._weights.get(f"{component}/{fqn[len(prefix):]}", self._buffers.get(f"{name}/{fqn}"))
                if tensor is not None:
                    constants[fqn] = tensor
            package = load_package(self.engine_dir / info["package"], constants)
            self._networks[name] = CompiledNetwork(name, package, info.get("static_shape"))
        return self._networks[name]

    @torch.inference_mode()
    def encode_text(self, input_ids, input_ids_2=None, clip_skip=None):
        """Token ids (B, 77) -> (context (B, 77, D), pooled (B, P) or None), as the eager backend:
        SDXL concatenates both encoders' hidden states and takes the second's pooled output; both
        encoders skip clip_skip layers. Ids past the engine's vocabulary (textual inversion) run
        through the eager text encoders (the engine has the checkpoint's token table)."""
        if int(input_ids.max()) >= self.engine_vocab_size():
            ids_2 = input_ids_2.to(self.device) if input_ids_2 is not None else None
            context, pooled = run_text_encoders(self.text_encoder, self.text_encoder_2, input_ids.to(self.device),
                                                ids_2, clip_skip)
            return context, pooled if self.text_encoder_2 is not None else None  # as the compiled path
        skip = 0 if clip_skip is None else int(clip_skip)
        for encoder in (self.text_encoder, self.text_encoder_2):  # the compiled graphs clamp: check as eager does
            if encoder is not None:
                encoder.output_index(clip_skip)
        skips = torch.full((input_ids.shape[0],), skip, dtype=torch.long, device=self.device)  # (B,)
        context = self._network("text_encoder")(input_ids.to(self.device), skips)[0]
        if self.text_encoder_2 is None:
            return context, None
        context_2, pooled = self._network("text_encoder_2")(input_ids_2.to(self.device), skips)
        return torch.cat([context, context_2], dim=-1), pooled  # (B, 77, D1 + D2), (B, P)

    @torch.inference_mode()
    def denoise(self, x_in, t, context, added_cond=None, controls=(), step=None):
        """One compiled UNet forward; float32 out. All entries of t must be equal (one step).
        controls: ControlNets active at this step (controlnet_fn), their residuals summed into the
        compiled UNet that takes them (the ControlNet engine's unet_control.pt2). step: a
        DeepCache call (sdengine.acceleration.UNetStep), run by the DeepCache engine's full or
        cached step."""
        if (added_cond is not None) != (self.text_encoder_2 is not None):
            raise ValueError("the aoti backend takes added conditioning (text_embeds, time_ids) exactly for SDXL")
        x = x_in.to(self.device, self.dtype).contiguous()
        t = _timesteps(t, x.shape[0], self.device)
        context = context.to(self.device, self.dtype).contiguous()
        if added_cond is not None:
            added_cond = {k: added_cond[k].to(self.device, self.dtype).contiguous() for k in ("text_embeds", "time_ids")}
        inputs = [x, t, context, *(added_cond.values() if added_cond is not None else ())]
        if step is not None:
            if controls:
                raise ValueError("the aoti backend runs DeepCache without ControlNets (its DeepCache engine takes no "
                                 "residuals); backend='eager' runs both")
            return self._deepcache_step(inputs, step)
        if controls:
            from ..controlnet import residuals

            down, mid = residuals(self.controlnet_fn, controls, [c.scale for c in controls], x, t, context,
                                  added_cond, self.config.vae.latent_channels)
            return self._networks["unet_control"](*inputs, [d.contiguous() for d in down], mid.contiguous())[0].float()
        return self._network("unet")(*inputs)[0].float()

    def _deepcache_step(self, inputs: list, step) -> torch.Tensor:
        """DeepCache's full step (keeps the branch's state) or cached step (from the kept state)."""
        from ..models.caching import COMPUTE, REUSE

        kind, cached = step.kwargs["kind"], step.kwargs["cached"]
        if kind.in_blocks:
            raise ValueError(f"the aoti backend runs DeepCache's steps only, not {kind}")
        if kind.deep == COMPUTE or (kind.deep == REUSE and "deep" not in cached):  # as the UNet: a plain call
            return self._network("unet")(*inputs)[0].float()
        name = "unet_deep_reuse" if kind.deep == REUSE else "unet_deep_store"
        network = self._deepcache_network(kind.branch[0] * 3 + kind.branch[1], name)
        if kind.deep == REUSE:
            return network(*inputs, cached["deep"].contiguous())[0].float()
        out, deep = network(*inputs)
        step.keep({"deep": deep})
        return out.float()

    def _deepcache_network(self, branch: int, name: str) -> CompiledNetwork:
        key = f"{name}:{branch}"
        if key not in self._networks:
            engine = self.deepcache_engine(branch)
            info = json.loads((engine / "deepcache_engine.json").read_text())["networks"][name]
            constants = {fqn: self._weights[f"unet/{fqn[len(info['prefix']):]}"] for fqn in info["constants"]}
            self._networks[key] = CompiledNetwork(name, load_package(engine / info["package"], constants))
        return self._networks[key]

    # ControlNets -----------------------------------------------------------------------------

    def controlnet_fn(self, control):
        """The ControlNet through its compiled engine (export/aoti_controlnet.py: controlnet.pt2, and
        unet_control.pt2, the UNet that takes the residuals; found in the cache or built on first
        use), holding the ControlNet's weights (cast once to the engine's dtype and device) and the
        UNet's own tensors (no copy: a LoRA merged in place reaches it). Scale, guess mode and the
        sum over ControlNets are applied to its outputs here."""
        from ..models.controlnet import scale_residuals
        from sdengine.export import aoti_controlnet

        controlnet = control.controlnet
        fns = self.__dict__.setdefault("_controlnet_fns", {})
        entry = fns.get(id(controlnet.model))
        if entry is not None and entry[0] is controlnet.model:
            return entry[1]
        engines = self.__dict__.setdefault("_controlnet_engines", {})
        key = aoti_controlnet.engine_key(self.config, controlnet.config, self.dtype, self.device)
        if key not in engines:
            engines[key] = aoti_controlnet.controlnet_engine_for(self.config, controlnet.config, dtype=self.dtype,
                                                                 device=self.device, progress=self._progress)
        engine = engines[key]
        meta = json.loads((engine / "controlnet_engine.json").read_text())
        info = meta["networks"]["controlnet"]
        weights = {info["prefix"] + k: v.detach().to(self.device, self.dtype if v.is_floating_point() else v.dtype)
                   .contiguous() for k, v in controlnet.model.state_dict().items()}
        package = CompiledNetwork("controlnet", load_package(engine / info["package"], weights))
        if "unet_control" not in self._networks:
            info = meta["networks"]["unet_control"]
            constants = {fqn: self._weights[f"unet/{fqn[len(info['prefix']):]}"] for fqn in info["constants"]}
            self._networks["unet_control"] = CompiledNetwork("unet_control",
                                                             load_package(engine / info["package"], constants))
        global_pool = controlnet.config.global_pool_conditions

        def run(x, t, context, image, scale, guess_mode, added_cond, _keep=weights):
            inputs = [x.contiguous(), _timesteps(t, x.shape[0], self.device), context.contiguous(), image.contiguous()]
            if added_cond is not None:
                inputs += [added_cond[k].contiguous() for k in ("text_embeds", "time_ids")]
            outputs = package(*inputs)
            return scale_residuals(outputs[:-1], outputs[-1], scale, guess_mode, global_pool)

        fns[id(controlnet.model)] = (controlnet.model, run)
        return run

    @torch.inference_mode()
    def encode_image(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> (mean, logvar), float32, by the compiled encoder."""
        out = self._network("vae_encoder")(images.to(self.device, self.dtype).contiguous())[0]
        mean, logvar = out.float().chunk(2, dim=1)  # (B, C, h, w) each
        return mean, logvar

    @torch.inference_mode()
    def decode(self, latents):
        """Unscaled latents -> images (B, 3, H, W) in about [-1, 1], float32, by the compiled decoder."""
        return self._network("vae_decoder")(latents.to(self.device, self.dtype).contiguous())[0].float()
