"""engine.json's rules, checked before an engine is trusted (the Python side of
csrc/src/engine_meta.cpp, which holds the same rules and says them in its header).

`read_engine_meta(engine_dir)` reads and checks an engine folder's engine.json;
`engine_problem(engine_dir)` says why a cache entry cannot be used (None when it can), so
`aoti.engine_for` skips a corrupt entry with a warning and rebuilds it instead of trusting
it. tests/test_fuzz.py feeds both readers mutated engine.json files: they must accept
exactly the same ones and read the same values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

# engine.json's format (csrc/src/engine_meta.h kFormatVersion): 2: single-file sources ("ldm") and
# defaults ("single_file"); 3: vae_encoder, SDXL; 4: the LoRA name table ("lora") and the text
# encoders' added-token tables; 5: the text encoders' clip_skip input; 6: the UNet's context of any
# number of 77-token windows ("max_prompt_windows")
FORMAT_VERSION = 6
MAX_DEPTH = 16
NETWORK_NAMES = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
REQUIRED_NETWORKS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")
TRANSFORMS = ("", "q", "k", "v", "transpose")
SCHEDULER_FLAGS = ("clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr", "use_karras_sigmas",
                   "use_exponential_sigmas", "lower_order_final", "euler_at_final", "skip_prk_steps")
SCHEDULER_NAMES = ("beta_schedule", "prediction_type", "timestep_spacing", "final_sigmas_type", "solver_type",
                   "sampler", "_class_name")


class EngineMetaError(ValueError):
    """engine.json breaks a rule; the message names the key."""


def _fail(key: str, rule: str):
    raise EngineMetaError(f"{key} {rule}")


class _Duplicate(Exception):
    pass


def _pairs(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen


def loads(data: bytes):
    """JSON as Python's json module reads it, from strict UTF-8, refusing a key given twice."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_pairs)
    except _Duplicate as e:
        raise EngineMetaError(f"{e.args[0]} is given twice") from None
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
        raise EngineMetaError(f"is not valid JSON: {e}") from None


def _structure(value, key: str, depth: int) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            _fail(key, "holds a string that is not valid Unicode")
        return
    if not isinstance(value, (list, dict)):
        return
    if depth > MAX_DEPTH:
        _fail(key, f"nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, list):
        for item in value:
            _structure(item, key + "[]", depth + 1)
        return
    for name, item in value.items():
        _structure(name, key, depth)
        _structure(item, name if not key else f"{key}.{name}", depth + 1)


def _object(parent: dict, name: str, key: str) -> dict:
    if name not in parent:
        _fail(key, "is missing")
    if not isinstance(parent[name], dict):
        _fail(key, "must be an object")
    return parent[name]


def _optional(parent: dict, name: str):
    return parent.get(name)  # absent and null alike


def _string(parent: dict, name: str, key: str) -> str:
    if name not in parent:
        _fail(key, "is missing")
    if not isinstance(parent[name], str):
        _fail(key, "must be a string")
    return parent[name]


def _one_of(value: str, allowed, key: str) -> None:
    if value not in allowed:
        _fail(key, "must be one of " + ", ".join(f'"{a}"' for a in allowed) + f', got "{value}"')


def _integer(value, lo: int, hi: int, key: str) -> int:
    if type(value) is not int or not lo <= value <= hi:
        _fail(key, f"must be an integer in [{lo}, {hi}]")
    return value


def _member_integer(parent: dict, name: str, lo: int, hi: int, key: str) -> int:
    if name not in parent:
        _fail(key, "is missing")
    return _integer(parent[name], lo, hi, key)


def _finite(value, key: str) -> None:
    if type(value) not in (int, float) or not math.isfinite(value):
        _fail(key, "must be a finite number")


def _plain_name(name: str, key: str) -> None:
    if not name or name[0] == "." or "/" in name or "\0" in name:
        _fail(key, f'must name a file in the engine folder (no \'/\', not hidden), got "{name}"')


def _scheduler(s: dict, key: str) -> None:
    if _optional(s, "num_train_timesteps") is not None:
        _integer(s["num_train_timesteps"], 2, 100000, f"{key}.num_train_timesteps")
    if _optional(s, "steps_offset") is not None:
        _integer(s["steps_offset"], 0, 1000, f"{key}.steps_offset")
    for name in ("beta_start", "beta_end", "clip_sample_range", "sigma_min", "sigma_max"):
        if _optional(s, name) is not None:
            _finite(s[name], f"{key}.{name}")
    for name in SCHEDULER_FLAGS:
        if _optional(s, name) is not None and not isinstance(s[name], bool):
            _fail(f"{key}.{name}", "must be a boolean")
    for name in SCHEDULER_NAMES:
        if _optional(s, name) is not None and not isinstance(s[name], str):
            _fail(f"{key}.{name}", "must be a string")
    if _optional(s, "prediction_type") is not None:
        _one_of(s["prediction_type"], ("epsilon", "v_prediction", "sample"), f"{key}.prediction_type")


def _network(net: dict, key: str) -> None:
    package = _string(net, "package", f"{key}.package")
    _plain_name(package, f"{key}.package")
    if len(package) < 5 or not package.endswith(".pt2"):
        _fail(f"{key}.package", f'must be a .pt2 file, got "{package}"')
    _one_of(_string(net, "component", f"{key}.component"), COMPONENTS, f"{key}.component")
    prefix = _string(net, "prefix", f"{key}.prefix")
    constants = _object(net, "constants", f"{key}.constants")
    for fqn, shape in constants.items():
        where = f"{key}.constants.{fqn}"
        if len(fqn) <= len(prefix) or not fqn.startswith(prefix):
            _fail(where, f'must start with the prefix "{prefix}"')
        if not isinstance(shape, list) or len(shape) > 8:
            _fail(where, "must be a shape: at most 8 integers")
        for d in shape:
            _integer(d, 0, 2**31 - 1, where)
    if "ldm" in net:
        ldm = net["ldm"]
        if not isinstance(ldm, dict):
            _fail(f"{key}.ldm", "must be an object")
        for fqn, sources in ldm.items():
            where = f"{key}.ldm.{fqn}"
            if fqn not in constants:
                _fail(where, "names no constant of the network")
            if not isinstance(sources, list) or not sources:
                _fail(where, "must be a non-empty array of [key, transform]")
            for source in sources:
                if not (isinstance(source, list) and len(source) == 2 and all(isinstance(s, str) for s in source)):
                    _fail(where, "must hold [key, transform] pairs of strings")
                _one_of(source[1], TRANSFORMS, f"{where} transform")
    if "compile_s" in net and type(net["compile_s"]) not in (int, float):
        _fail(f"{key}.compile_s", "must be a number")
    # static_shape (export/aoti.py ATTEMPTS): the first input's only shape, null when dynamic.
    static = _optional(net, "static_shape")
    if static is not None:
        if not isinstance(static, list) or not 1 <= len(static) <= 8:
            _fail(f"{key}.static_shape", "must be null or a shape: 1 to 8 integers")
        for d in static:
            _integer(d, 1, 2**31 - 1, f"{key}.static_shape")


def check_engine_meta(meta) -> None:
    """Raise EngineMetaError naming the key when `meta` (parsed engine.json) breaks a rule."""
    if not isinstance(meta, dict):
        _fail("the document", "must be an object")
    _structure(meta, "", 1)
    if _member_integer(meta, "format", 0, 1000000, "format") != FORMAT_VERSION:
        _fail("format", f"is {meta['format']}, this library reads {FORMAT_VERSION} (rebuild the engine)")
    _string(meta, "torch_version", "torch_version")
    _string(meta, "cpu_capability", "cpu_capability")
    _one_of(_string(meta, "device", "device"), ("cpu", "cuda"), "device")
    _one_of(_string(meta, "dtype", "dtype"), ("fp32", "fp16", "bf16"), "dtype")
    _member_integer(meta, "latent_multiple", 1, 64, "latent_multiple")
    _member_integer(meta, "max_batch", 1, 4096, "max_batch")
    _member_integer(meta, "max_latent", 1, 65536, "max_latent")
    _member_integer(meta, "max_prompt_windows", 1, 4096, "max_prompt_windows")

    config = _object(meta, "config", "config")
    vae = _object(config, "vae", "config.vae")
    if _optional(vae, "latent_channels") is not None:
        _integer(vae["latent_channels"], 1, 64, "config.vae.latent_channels")
    if _optional(vae, "block_out_channels") is not None:
        blocks = vae["block_out_channels"]
        if not isinstance(blocks, list) or not 1 <= len(blocks) <= 8:
            _fail("config.vae.block_out_channels", "must be 1 to 8 integers")
        for d in blocks:
            _integer(d, 1, 65536, "config.vae.block_out_channels")
    if _optional(vae, "scaling_factor") is not None:
        _finite(vae["scaling_factor"], "config.vae.scaling_factor")
        if vae["scaling_factor"] <= 0:
            _fail("config.vae.scaling_factor", "must be > 0")
    if _optional(vae, "shift_factor") is not None:
        _finite(vae["shift_factor"], "config.vae.shift_factor")
    unet = _object(config, "unet", "config.unet")
    if _optional(unet, "in_channels") is not None:
        _integer(unet["in_channels"], 1, 1024, "config.unet.in_channels")
    if _optional(unet, "sample_size") is not None:
        _integer(unet["sample_size"], 1, 4096, "config.unet.sample_size")
    _scheduler(_object(config, "scheduler", "config.scheduler"), "config.scheduler")

    networks = _object(meta, "networks", "networks")
    for name, net in networks.items():
        _one_of(name, NETWORK_NAMES, "networks key")
        if not isinstance(net, dict):
            _fail(f"networks.{name}", "must be an object")
        _network(net, f"networks.{name}")
    for name in REQUIRED_NETWORKS:
        if name not in networks:
            _fail(f"networks.{name}", "is missing")

    if "lora" in meta:  # LoRA module name -> "<component>/<key>" (sdengine.lora.lora_names)
        if not isinstance(meta["lora"], dict):
            _fail("lora", "must be an object")
        for name, target in meta["lora"].items():
            where = f"lora.{name}"
            if not isinstance(target, str):
                _fail(where, 'must be a string "<component>/<key>"')
            component, slash, key = target.partition("/")
            if not slash or not key:
                _fail(where, 'must be "<component>/<key>"')
            _one_of(component, ("unet", "text_encoder", "text_encoder_2"), f"{where} component")

    if "single_file" in meta:
        single = meta["single_file"]
        if not isinstance(single, dict):
            _fail("single_file", "must be an object")
        _string(single, "family", "single_file.family")
        _one_of(_string(single, "default_prediction_type", "single_file.default_prediction_type"),
                ("epsilon", "v_prediction"), "single_file.default_prediction_type")
        schedulers = _object(single, "schedulers", "single_file.schedulers")
        for name in ("epsilon", "v_prediction"):
            _scheduler(_object(schedulers, name, f"single_file.schedulers.{name}"), f"single_file.schedulers.{name}")
        for name in ("tokenizer", "tokenizer_2"):
            if name in single:
                _plain_name(_string(single, name, f"single_file.{name}"), f"single_file.{name}")


def read_engine_meta(engine_dir) -> dict:
    """The checked engine.json of an engine folder (FileNotFoundError, EngineMetaError)."""
    path = Path(engine_dir) / "engine.json"
    try:
        meta = loads(path.read_bytes())
        check_engine_meta(meta)
    except EngineMetaError as e:
        raise EngineMetaError(f"{path}: {e}") from None
    return meta


def engine_problem(engine_dir) -> Optional[str]:
    """Why the engine folder cannot be used: no folder, a corrupt engine.json, a missing
    package; None when it can."""
    engine_dir = Path(engine_dir)
    if not (engine_dir / "engine.json").is_file():
        return "no engine.json" if engine_dir.exists() else "absent"
    try:
        meta = read_engine_meta(engine_dir)
    except (OSError, EngineMetaError) as e:
        return str(e)
    for name, net in meta["networks"].items():
        if not (engine_dir / net["package"]).is_file():
            return f"{engine_dir}: the {name} package {net['package']} is missing"
    return None
