"""Ahead-of-time compiled networks for the native runtime (AOTInductor).

`torch.export` + AOTInductor turn the text encoder, the UNet and the VAE decoder into
`.pt2` packages that libsdengine (csrc/) loads with `AOTIModelPackageLoader`. On CUDA
the packages hold Triton kernels; on the CPU, C++ kernels.

Weights are NOT in the packages (`aot_inductor.package_constants_in_so=False`): the
runtime hands them over at load time (`load_constants`), so one compiled engine serves
every checkpoint of an architecture. `always_keep_tensor_constants=True` stops inductor
from inlining small weights (a 4-element conv bias) as literals into the kernels, which
would bake those values into the package.

An engine is a folder:

    engine.json        what the runtime needs: versions, device, dtype, the model config,
                       and per network its package, the prefix of its constant names,
                       every constant's shape (the runtime checks weights against them) and
                       the single-file tensors each constant may be read from ("ldm"); under
                       "single_file", the family's defaults for single files (schedulers
                       per prediction type, default prediction type, tokenizer folder)
    text_encoder.pt2   input_ids (B, 77) int64, clip_skip (B,) int64 -> hidden states (B, 77, D) at
                       that clip_skip (every clip_skip from one graph: export/graphs.py)
    text_encoder_2.pt2 SDXL: input_ids, clip_skip         -> (hidden states (B, 77, D2), pooled (B, P))
    unet.pt2           x (B, C, h, w), t (B,) float32, context (B, 77·k, D) -> (B, C_out, h, w);
                       SDXL also text_embeds (B, P) and time_ids (B, 6). k: the prompt's 77-token
                       windows (A1111's long prompts and BREAK), 1 to "max_prompt_windows"
    vae_decoder.pt2    unscaled latents z (B, C, h, w)    -> images (B, 3, 8h, 8w) in [-1, 1]
    vae_encoder.pt2    images (B, 3, 8h, 8w) in [-1, 1]  -> posterior [mean, logvar] (B, 2C, h, w)
    buffers.safetensors   constants that are not checkpoint weights (non-persistent buffers): the
                       text encoders' added-token tables (embeddings.ADDED_TOKENS rows of zeros, for
                       textual-inversion vectors written at run time, ids from vocab_size on)
    "lora" in engine.json: every module name a LoRA file may use -> "<component>/<key>"
                       (sdengine.lora.lora_names), which libsdengine maps LoRA files through
    tokenizer/         the family's CLIP tokenizer, for single files (which carry none)

Engines are cached under `$SDE_CACHE_DIR/aoti/<key>/` (default `~/.cache/sdengine/aoti`),
keyed by the networks' architecture, dtype, device, CPU capability and torch version;
`engine_for(...)` builds one on first use, `sdengine export aoti MODEL` ahead of time.
Batch, height, width and the context's window count are dynamic: one engine serves every size. Each network compiles
in a child process (`python -m sdengine.export.aoti --compile-network SPEC`), so a crash
inside the compiler is an error that names the network, with the child's output. A network
whose compile crashes is compiled again with safer settings (ATTEMPTS: its weights compiled
into the package too, then static shapes), so that an engine builds wherever one can; every
attempt is recorded in engine.json. A network built with static shapes (`static_shape` in
engine.json) runs at that shape only: the runtime runs batch-1 networks row by row and refuses
other shapes with an error naming the network; a static UNet takes one window ("max_prompt_windows": 1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from sdengine.device import dtype_name

from .engine_meta import FORMAT_VERSION
from .graphs import PREFIX, TextEncoderGraph, UNetGraph, VAEDecoderGraph, VAEEncoderGraph

NETWORKS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")  # text_encoder_2: SDXL
MAX_BATCH = 64
MAX_LATENT = 512  # latent cells per side: 4096 px with an 8x VAE
MAX_WINDOWS = 32  # 77-token windows a UNet context may hold: A1111 prompts of up to 32 x 75 tokens

log = logging.getLogger("sdengine")


# ---------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------

def cache_root() -> Path:
    """`$SDE_CACHE_DIR/aoti`, default `~/.cache/sdengine/aoti`."""
    base = os.environ.get("SDE_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "sdengine") / "aoti"


def cpu_capability() -> str:
    """The CPU's vector ISA as torch names it (AVX2, AVX512, ...): CPU kernels are compiled for it."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 (an old torch without the query)
        return "unknown"


def engine_key(config, dtype: torch.dtype, device: torch.device) -> str:
    """The cache key: a hash of the networks' architecture, dtype, device kind, CPU
    capability (CPU kernels only run where they were compiled) and torch version."""
    device = torch.device(device)
    arch = {name: dataclasses.asdict(getattr(config, name)) if getattr(config, name) is not None else None
            for name in ("text_encoder", "text_encoder_2", "unet", "vae")}
    ident = json.dumps({"arch": arch, "dtype": dtype_name(dtype), "device": device.type,
                        "cpu": cpu_capability() if device.type == "cpu" else None,
                        "torch": torch.__version__, "format": FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def check_supported(config) -> None:
    """The native runtime runs SD1, SD2 and SDXL models: text-to-image and img2img with
    4-channel UNets, inpainting with 9-channel ones."""
    if config.text_encoder is None:
        raise ValueError(f"{config.name}: SDXL's refiner (no first text encoder, an aesthetic score) has no compiled "
                         "engine; run it with backend='eager', 'graph', 'triton' or 'compile'")
    if config.unet.addition_embed_type not in (None, "text_time"):
        raise ValueError(f"{config.name}: the native backend does not support the UNet's "
                         f"{config.unet.addition_embed_type!r} added embedding")
    if (config.unet.addition_embed_type == "text_time") != (config.text_encoder_2 is not None):
        raise ValueError(f"{config.name}: SDXL's added conditioning needs its second text encoder, and only it")
    if config.unet.in_channels not in (config.vae.latent_channels, 2 * config.vae.latent_channels + 1):
        raise ValueError(f"{config.name}: the native backend runs UNets of {config.vae.latent_channels} channels "
                         f"(text-to-image) or {2 * config.vae.latent_channels + 1} (inpainting), not "
                         f"{config.unet.in_channels}")


# ---------------------------------------------------------------------------
# Building an engine
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CompileSettings:
    """How one network is exported and compiled: one attempt of an engine build.

    The defaults give the engine its full reach (every batch and latent size, weights handed
    over at load time). A network whose compile crashes or fails is compiled again with the
    next settings of ATTEMPTS, each avoiding more of what could have crashed it, and every
    attempt is recorded in engine.json (`networks.<name>.attempts`)."""

    name: str
    # aot_inductor.package_constants_in_so: the (random) weights compiled into the package as
    # well; the runtime still replaces them with the checkpoint's at load time (user-managed
    # constants), at the cost of that memory.
    constants_in_so: bool = False
    # always_keep_tensor_constants: weights stay constants, never literals inside the kernels.
    # Only for bisecting (bisect_settings): an engine must keep it, else small weights (a
    # 4-element conv bias) of the random build weights would be baked into its kernels.
    keep_tensor_constants: bool = True
    # Read the package's constant names by loading it in the compiling process (else: the
    # constants the exported graph uses).
    load_package: bool = True
    # fx backed_size_oblivious: sizes 0 and 1 not specialised, so that batch 1 is in range.
    size_oblivious: bool = True
    # Static shapes: batch STATIC_BATCH[name] (1 for the text encoders and the VAE: the
    # runtime runs their rows one by one; 2 for the UNet: one image with guidance) at the
    # config's default latent size. The engine then serves that UNet workload only.
    static: bool = False


ATTEMPTS = (
    CompileSettings("dynamic"),
    CompileSettings("constants-in-so", constants_in_so=True, load_package=False),
    CompileSettings("static", constants_in_so=True, load_package=False, size_oblivious=False, static=True),
)
STATIC_BATCH = {"text_encoder": 1, "text_encoder_2": 1, "unet": 2, "vae_decoder": 1, "vae_encoder": 1}
# Test hook: "network:settings[,network:settings...]" makes those compile children abort
# (os.abort) before they start, as a compiler crash would kill them (tests/test_native_engine_build.py).
INJECT_CRASH_ENV = "SDE_AOTI_INJECT_CRASH"


def example_inputs(config, dtype, device, static: bool = False):
    """Example inputs of every network and their dynamic dimensions (None when static).

    Dynamic: batch 2, latents of 2 x the UNet's downsampling and contexts of 2 windows, with
    batch, height, width and windows dynamic. Static: batch STATIC_BATCH[name] at the config's
    default latent size, one window."""
    if hasattr(config, "example_inputs"):  # an engine beside the model's (export/side_engine.py): dynamic only
        if static:
            raise ValueError(f"{config.name}: engines beside the model's (ControlNet, DeepCache) are built with "
                             "dynamic shapes only")
        return config.example_inputs(dtype, device)
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=MAX_BATCH)
    multiple = 2 ** (len(config.unet.block_out_channels) - 1)  # the UNet halves the latents this often
    h, w = Dim("h", min=1, max=MAX_LATENT // multiple), Dim("w", min=1, max=MAX_LATENT // multiple)
    tokens = config.text_encoder.max_position_embeddings
    latent_c = config.vae.latent_channels
    lh = lw = config.unet.sample_size if static else 2 * multiple
    down = config.vae.downscale

    def rows(name):
        return STATIC_BATCH[name] if static else 2

    ids = torch.zeros(rows("text_encoder"), tokens, dtype=torch.long, device=device)
    clip_skip = torch.zeros(rows("text_encoder"), dtype=torch.long, device=device)
    b = rows("unet")
    x = torch.randn(b, config.unet.in_channels, lh, lw, device=device, dtype=dtype)
    t = torch.full((b,), 500.0, device=device)
    context = torch.randn(b, tokens * (1 if static else 2), config.unet.cross_attention_dim, device=device,
                          dtype=dtype)
    z = torch.randn(rows("vae_decoder"), latent_c, lh, lw, device=device, dtype=dtype)
    images = torch.rand(rows("vae_encoder"), 3, lh * down, lw * down, device=device, dtype=dtype) * 2 - 1
    unet_args = (x, t, context)
    unet_dynamic = {"x": {0: batch, 2: multiple * h, 3: multiple * w}, "t": {0: batch}, "context": context_dims(batch, tokens)}
    if config.text_encoder_2 is not None:  # SDXL's added conditioning
        text_embeds = torch.randn(b, config.text_encoder_2.projection_dim, device=device, dtype=dtype)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * b, device=device, dtype=dtype)
        unet_args += (text_embeds, time_ids)
        unet_dynamic.update({"text_embeds": {0: batch}, "time_ids": {0: batch}})
    examples = {
        "text_encoder": ((ids, clip_skip), {"input_ids": {0: batch}, "clip_skip": {0: batch}}),
        "text_encoder_2": ((ids, clip_skip), {"input_ids": {0: batch}, "clip_skip": {0: batch}}),
        "unet": (unet_args, unet_dynamic),
        "vae_decoder": ((z,), {"z": {0: batch, 2: multiple * h, 3: multiple * w}}),
        "vae_encoder": ((images,), {"x": {0: batch, 2: down * multiple * h, 3: down * multiple * w}}),
    }
    if static:
        examples = {name: (args, None) for name, (args, _) in examples.items()}
    return examples, multiple


def context_dims(batch, tokens: int) -> dict:
    """A UNet or ControlNet context's dynamic dimensions: batch, and any number of 77-token windows."""
    return {0: batch, 1: tokens * torch.export.Dim("windows", min=1, max=MAX_WINDOWS)}


def _export(module, args, dynamic_shapes, size_oblivious: bool = True):
    """torch.export; with size_oblivious, sizes 0/1 are not specialised (so that batch 1 is in range)."""
    import torch.fx.experimental._config as fx_config

    with torch.no_grad():
        if size_oblivious and dynamic_shapes is not None and hasattr(fx_config, "backed_size_oblivious"):
            with fx_config.patch(backed_size_oblivious=True):
                return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)


def _compile(exported, package_path: Path, settings: CompileSettings = ATTEMPTS[0]):
    inductor_configs = {
        "aot_inductor.package_constants_in_so": settings.constants_in_so,
        "always_keep_tensor_constants": settings.keep_tensor_constants,
    }
    torch._inductor.aoti_compile_and_package(exported, package_path=str(package_path),
                                             inductor_configs=inductor_configs)


def _network_module(config, name: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The export wrapper of network `name`, built from the config on `device` in `dtype` with
    random weights (their values are not packaged; non-persistent buffers come out exact)."""
    if hasattr(config, "network_module"):  # an engine beside the model's (aoti_controlnet.py, aoti_deepcache.py)
        return config.network_module(name, dtype, device)
    from sdengine.embeddings import ADDED_TOKENS
    from sdengine.models.clip import CLIPTextModel
    from sdengine.models.unet import UNet2DConditionModel
    from sdengine.models.vae import AutoencoderKL

    with torch.device(device):
        if name == "text_encoder":
            module = TextEncoderGraph(CLIPTextModel(config.text_encoder), outputs="hidden")
        elif name == "text_encoder_2":
            module = TextEncoderGraph(CLIPTextModel(config.text_encoder_2), outputs="pooled")
        elif name == "unet":
            module = UNetGraph(UNet2DConditionModel(config.unet), one_timestep=True)
        elif name == "vae_decoder":
            module = VAEDecoderGraph(AutoencoderKL(config.vae))
        elif name == "vae_encoder":
            module = VAEEncoderGraph(AutoencoderKL(config.vae), stacked=True)
        else:
            raise ValueError(f"unknown network {name!r}; expected one of {NETWORKS}")
        if name in ("text_encoder", "text_encoder_2"):  # room for textual-inversion tokens (ids from vocab_size)
            module.m.text_model.embeddings.reserve_added_tokens(ADDED_TOKENS)  # as every backend's
    return module.to(dtype=dtype).eval()


def _graph_constants(exported) -> set:
    """The parameters, buffers and tensor constants that the exported graph reads."""
    read = {node.name for node in exported.graph.nodes if node.op == "placeholder" and node.users}
    return {spec.target for spec in exported.graph_signature.input_specs
            if spec.target is not None and spec.arg.name in read}


def _compile_network(config, name: str, dtype: torch.dtype, device: torch.device, folder: Path,
                     settings: CompileSettings = ATTEMPTS[0]) -> None:
    """Export and compile one network into `folder` with `settings`: `<name>.pt2`, `<name>.json`
    (its constants' shapes, its static input shape if any, compile time) and
    `<name>.buffers.safetensors` (its non-persistent buffers, if any). Runs in a child process
    (see compile_in_child)."""
    start = time.perf_counter()
    module = _network_module(config, name, dtype, device)
    examples, _ = example_inputs(config, dtype, device, static=settings.static)
    args, dynamic = examples[name]
    exported = _export(module, args, dynamic, size_oblivious=settings.size_oblivious)
    _compile(exported, folder / f"{name}.pt2", settings)
    if settings.load_package:
        used = set(torch._inductor.aoti_load_package(str(folder / f"{name}.pt2")).get_constant_fqns())
    else:
        used = _graph_constants(exported)
    state_keys = set(module.state_dict().keys())
    constants, buffers = {}, {}
    for fqn, tensor in list(exported.state_dict.items()) + list(exported.constants.items()):
        if not isinstance(tensor, torch.Tensor) or fqn not in used:  # the VAE encoder, ...
            continue
        constants[fqn] = list(tensor.shape)
        if fqn not in state_keys:  # a non-persistent buffer: no checkpoint holds it
            buffers[fqn] = tensor.detach().to("cpu").contiguous()
    if buffers:
        from safetensors.torch import save_file

        save_file(buffers, str(folder / f"{name}.buffers.safetensors"))
    result = {"constants": constants, "compile_s": round(time.perf_counter() - start, 1),
              "static_shape": list(args[0].shape) if settings.static else None}
    (folder / f"{name}.json").write_text(json.dumps(result))


def _die_with_parent() -> None:
    """In a compile child: ask Linux for SIGKILL when the builder dies (a killed builder does
    not leave its compiler running)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


class CompileCrash(RuntimeError):
    """A network's compile child died or failed: `outcome` says how, `output` is its last output."""

    def __init__(self, message: str, outcome: str, output: str):
        super().__init__(message)
        self.outcome, self.output = outcome, output


def compile_in_child(config, name: str, dtype: torch.dtype, device: torch.device, folder: Path,
                      settings: CompileSettings = ATTEMPTS[0], timeout: Optional[float] = None) -> dict:
    """_compile_network in a child process, so that a compiler crash (a segfault inside torch,
    seen with torch 2.11 on CUDA) is an error (CompileCrash) that names the network, not a dead
    process. Returns the network's result: constants, compile_s, static_shape and buffers."""
    import pickle
    import signal
    import subprocess
    import sys

    spec = folder / f".{name}.spec.pkl"
    spec.write_bytes(pickle.dumps({"config": config, "name": name, "dtype": dtype, "device": device,
                                   "folder": str(folder), "settings": settings}))
    cmd = [sys.executable, "-X", "faulthandler", "-m", "sdengine.export.aoti", "--compile-network", str(spec)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              preexec_fn=_die_with_parent)
        rc, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:  # subprocess.run killed it
        rc, output = None, e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    spec.unlink(missing_ok=True)
    if rc != 0:
        how = f"timed out after {timeout:g} s" if rc is None else f"was killed by {signal.Signals(-rc).name}" \
            if rc < 0 and -rc in signal.valid_signals() else f"failed (exit status {rc})"
        tail = "\n".join(output.strip().splitlines()[-30:])
        for leftover in (f"{name}.pt2", f"{name}.json", f"{name}.buffers.safetensors"):
            (folder / leftover).unlink(missing_ok=True)
        raise CompileCrash(f"{config.name}: compiling the {name} network for {device.type} {dtype_name(dtype)} "
                           f"{how} (settings: {settings.name}); its last output:\n{tail}", how, tail)
    result = json.loads((folder / f"{name}.json").read_text())
    (folder / f"{name}.json").unlink()
    buffers_file = folder / f"{name}.buffers.safetensors"
    result["buffers"] = {}
    if buffers_file.is_file():
        from safetensors.torch import load_file

        result["buffers"] = load_file(str(buffers_file))
        buffers_file.unlink()
    return result


def _compile_with_retries(config, name: str, dtype: torch.dtype, device: torch.device, folder: Path,
                          attempts=ATTEMPTS, log=None) -> dict:
    """Compile network `name` with each of `attempts` in turn until one succeeds. Returns its
    result (as compile_in_child) with "settings" (the settings that built it) and "attempts"
    (each attempt: settings, outcome, seconds, and a failed one's last output). RuntimeError
    naming the network and every attempt's outcome when none succeeds."""
    tried = []
    for settings in attempts:
        started = time.perf_counter()
        try:
            result = compile_in_child(config, name, dtype, device, folder, settings)
        except CompileCrash as crash:
            tried.append({"settings": settings.name, "outcome": crash.outcome,
                          "seconds": round(time.perf_counter() - started, 1), "output": crash.output[-2000:]})
            if log is not None:
                log(f"{name}: the {settings.name} compile {crash.outcome}; retrying with safer settings"
                    if settings is not attempts[-1] else f"{name}: the {settings.name} compile {crash.outcome}")
            last = crash
            continue
        tried.append({"settings": settings.name, "outcome": "ok", "seconds": round(time.perf_counter() - started, 1)})
        result["settings"] = dataclasses.asdict(settings)
        result["attempts"] = tried
        return result
    summary = "; ".join(f"{a['settings']}: {a['outcome']}" for a in tried)
    raise RuntimeError(f"{config.name}: the {name} network did not compile for {device.type} {dtype_name(dtype)} "
                       f"with any settings ({summary}); the last attempt's output:\n{last.output}")


def build_engine(config, out_dir, *, dtype: torch.dtype, device, progress=True, replace: bool = True) -> Path:
    """Export and compile the networks of `config` (text encoder(s), UNet, VAE decoder and
    encoder) for `device` in `dtype` into the engine folder `out_dir`.

    Each network is compiled in a child process from the config, with random weights (their
    values are not packaged: one engine serves every checkpoint of the architecture), so a
    crash inside the compiler is an error naming the network. A network whose compile crashes
    or fails is compiled again with the next, safer settings of ATTEMPTS; engine.json records
    every attempt (`networks.<name>.attempts`), the settings that built each network and the
    whole build's time (`build_s`). The folder is written to a temporary sibling and renamed,
    so a half-built engine is never seen. replace=False keeps an engine that another process
    finished meanwhile (the cache's case).
    """
    from tqdm.auto import tqdm

    from sdengine import cachedir
    from sdengine.lora import lora_names

    check_supported(config)
    device = torch.device(device)
    out_dir = Path(out_dir)
    tmp = cachedir.staging(out_dir)
    started = time.perf_counter()
    try:
        multiple = 2 ** (len(config.unet.block_out_channels) - 1)  # as example_inputs
        components = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet",
                      "vae_decoder": "vae", "vae_encoder": "vae"}
        networks, buffers = {}, {}
        names = [name for name in NETWORKS if name != "text_encoder_2" or config.text_encoder_2 is not None]
        bar = tqdm(names, desc="AOTInductor compile", unit="network", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            result = _compile_with_retries(config, name, dtype, device, tmp, log=bar.write if progress else None)
            constants = result["constants"]
            buffers.update({f"{name}/{fqn}": tensor for fqn, tensor in result["buffers"].items()})
            checkpoint = {fqn: shape for fqn, shape in constants.items() if fqn not in result["buffers"]}
            networks[name] = {"package": f"{name}.pt2", "component": components[name], "prefix": PREFIX,
                              "constants": constants, "ldm": _ldm_sources(config, components[name], checkpoint),
                              "compile_s": result["compile_s"], "static_shape": result.get("static_shape"),
                              "settings": result["settings"], "attempts": result["attempts"]}
        if buffers:
            from safetensors.torch import save_file

            save_file(buffers, str(tmp / "buffers.safetensors"))
        meta = {
            "format": FORMAT_VERSION, "torch_version": torch.__version__, "device": device.type,
            "dtype": dtype_name(dtype), "cpu_capability": cpu_capability() if device.type == "cpu" else "",
            "latent_multiple": multiple, "max_batch": MAX_BATCH, "max_latent": MAX_LATENT,
            "max_prompt_windows": 1 if networks["unet"]["static_shape"] else MAX_WINDOWS,
            "config": config.to_dict(), "networks": networks, "single_file": _single_file_info(config, tmp),
            "build_s": round(time.perf_counter() - started, 1),
            "lora": {name: f"{component}/{key}" for name, (component, key) in lora_names(config).items()},
        }
        (tmp / "engine.json").write_text(json.dumps(meta, indent=1))  # written last: it marks the folder whole
        cachedir.publish(tmp, out_dir, replace=replace or not (out_dir / "engine.json").is_file())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------
# What the runtime needs to read a single-file (LDM / A1111) checkpoint itself
# ---------------------------------------------------------------------------

def _ldm_sources(config, component: str, constants: dict) -> dict:
    """Per constant, the single-file tensors it may be read from, in the order to try them:
    [[key, transform], ...] with ldm_layout.Source's transforms ("", "q", "k", "v", "transpose").
    The runtime reshapes a source whose shape differs only by unit dimensions (LDM's 1x1
    convolutions where diffusers has Linear layers)."""
    from sdengine.ldm_layout import ldm_sources

    out = {}
    for fqn in constants:
        sources = ldm_sources(config, component, fqn[len(PREFIX):])
        if sources:
            out[fqn] = [[source.key, source.transform] for source in sources]
    return out


def _single_file_info(config, engine_dir: Path) -> dict:
    """The family's defaults for single files, which carry no configs: the scheduler for each
    prediction type and the default prediction type (see ldm_layout.detect_config), and the
    CLIP tokenizer of the family in `tokenizer/` when the text encoder has CLIP's vocabulary."""
    from sdengine.ldm_layout import default_prediction_type, family_preset, layout_for
    from sdengine.tokenizer import EOS_TOKEN, CLIPTokenizer

    family = layout_for(config).family
    schedulers = {}
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = family_preset(family, config.is_inpaint, prediction_type).scheduler
        schedulers[prediction_type] = dataclasses.replace(scheduler, prediction_type=prediction_type).to_dict()
    info = {"family": family, "default_prediction_type": default_prediction_type(family, config.is_inpaint),
            "schedulers": schedulers}
    encoders = {"tokenizer": (config.text_encoder, "!" if family == "sd2" else EOS_TOKEN),
                "tokenizer_2": (config.text_encoder_2, "!")}  # SDXL's OpenCLIP bigG pads with "!"
    for folder, (encoder, pad_token) in encoders.items():
        tokenizer = CLIPTokenizer.default(pad_token)
        if encoder is not None and tokenizer.vocab_size == encoder.vocab_size:
            tokenizer.save(engine_dir / folder)
            info[folder] = folder
    return info


def engine_for(config, *, dtype: torch.dtype, device, progress=True) -> Path:
    """The cached engine of the architecture of `config` for `device` and `dtype`, built on
    first use.

    An entry is used only when its engine.json passes export/engine_meta.py's rules and its
    packages exist; a corrupt one is rebuilt, with a warning. Builders of one entry take its
    lock (sdengine.cachedir), so concurrent processes build it once; an entry is written aside
    and renamed into place, so a builder killed mid-write leaves no entry, only a leftover that
    the next builder sweeps."""
    from sdengine import cachedir

    from .engine_meta import engine_problem

    path = cache_root() / engine_key(config, dtype, device)
    if engine_problem(path) is None:
        return path
    with cachedir.lock(path):
        problem = engine_problem(path)  # another process may have built it while this one waited
        if problem is None:
            return path
        cachedir.sweep(path)
        if problem != "absent":
            log.warning("the cached engine %s cannot be used (%s): building it again", path, problem)
        return build_engine(config, path, dtype=dtype, device=device, progress=progress, replace=True)


if __name__ == "__main__":  # the child process of compile_in_child
    import pickle
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "--compile-network":
        sys.exit("usage: python -m sdengine.export.aoti --compile-network SPEC (internal: see compile_in_child)")
    _spec = pickle.loads(Path(sys.argv[2]).read_bytes())
    _settings = _spec.get("settings", ATTEMPTS[0])
    if f"{_spec['name']}:{_settings.name}" in os.environ.get(INJECT_CRASH_ENV, "").split(","):
        os.abort()  # the test hook: die as a crashing compiler would
    _compile_network(_spec["config"], _spec["name"], _spec["dtype"], _spec["device"], Path(_spec["folder"]),
                     _settings)
