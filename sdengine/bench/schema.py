"""The JSON schema of a benchmark record, and its validation.

Other tools read these keys: change them only together with their readers. The schema
is kept as a file in the repository, `benchmarks/schema.json`, written from this module:

    python -m sdengine.bench.schema > benchmarks/schema.json

(a test checks that the two agree). `validate(record)` uses the `jsonschema` package when
it is installed, and otherwise a small checker of the keywords this schema uses.
"""

from __future__ import annotations

import json
import sys

SCHEMA_VERSION = 2  # 2: backends in processes of their own (prepare, host times, skip phases)
COMPONENT_NAMES = ["text_encoder", "unet_step", "vae_decode", "end_to_end"]

_NUMBER = {"type": "number"}
_COUNT = {"type": "integer", "minimum": 0}
_OPTIONAL_NUMBER = {"type": ["number", "null"]}
_OPTIONAL_COUNT = {"type": ["integer", "null"], "minimum": 0}
_MS_LIST = {"type": "array", "items": {"type": "number", "minimum": 0}}

MEASURED = {
    "type": "object",
    "required": ["backend", "component", "p50_ms", "p90_ms", "min_ms", "samples_ms", "peak_mem_bytes"],
    "properties": {
        "backend": {"type": "string"},  # "name" or "name@variant" (diffusers@bf16, sdcpp@q8_0)
        "component": {"enum": COMPONENT_NAMES},
        "dtype": {"enum": ["fp16", "bf16", "fp32"]},  # what the row multiplies in (its % of peak divides by that peak)
        "threads": {"type": "integer", "minimum": 1},  # torch's intra-op threads in the row's process
        "p50_ms": {"type": "number", "minimum": 0},
        "p90_ms": {"type": "number", "minimum": 0},
        "min_ms": {"type": "number", "minimum": 0},
        "mean_ms": _NUMBER,
        "std_ms": _NUMBER,
        "samples_ms": dict(_MS_LIST, minItems=1),
        # CPU time of each timed call until it returned (CUDA: its launches issued, no sync)
        "host_samples_ms": _MS_LIST,
        "host_p50_ms": _OPTIONAL_NUMBER,
        "warmup_ms": _MS_LIST,
        "first_call_ms": _OPTIONAL_NUMBER,  # the first call after prepare
        "prepare_s": _OPTIONAL_NUMBER,  # the backend's build + compile + capture (see "backends")
        "stopped_early": {"type": "boolean"},
        "it_per_s": _NUMBER,
        "flop": _OPTIONAL_COUNT,
        "tflops": _OPTIONAL_NUMBER,
        "pct_of_peak": _OPTIONAL_NUMBER,
        "floor_ms": _OPTIONAL_NUMBER,
        "unet_calls": _OPTIONAL_COUNT,
        # end_to_end only: what ran. sdengine backends: the sampler the pipeline ran and whether the
        # backend's fused step (UNet + guidance + sampler update in one function) ran it; diffusers:
        # its scheduler class.
        "sampler": {"type": ["string", "null"]},
        "fused_step": {"type": ["boolean", "null"]},
        "scheduler": {"type": "string"},
        # end_to_end, sdengine backends: each timed run's denoising loop (every step, without the
        # text encoder and the VAE), and the acceleration method of the row (sdengine bench --deepcache N)
        "loop_samples_ms": _MS_LIST,
        "loop_p50_ms": _OPTIONAL_NUMBER,
        "acceleration": {"type": "object"},
        # sdengine backends, end to end: the last run's time in the backend's network calls (the
        # rest is the sampler, the pipeline and the conversion to images)
        "phases_ms": {"type": "object"},
        "peak_mem_bytes": _OPTIONAL_COUNT,
        "mem_before_bytes": _OPTIONAL_COUNT,
        "process_peak_rss_bytes": _OPTIONAL_COUNT,
        "process_rss_scope": {"enum": ["component", "process"]},
        "nonfinite_output": {"type": ["boolean", "null"]},
        "speedup_vs_diffusers": _OPTIONAL_NUMBER,
    },
}

SKIPPED = {
    "type": "object",
    "required": ["backend", "skipped"],
    "properties": {
        "backend": {"type": "string"},
        "component": {"enum": COMPONENT_NAMES},
        "skipped": {"type": "string", "minLength": 1},
        "error": {"type": "boolean"},
        "phase": {"enum": ["load", "prepare", "run"]},  # where the backend's process was
        "log_tail": {"type": "string"},  # the end of its output, when it crashed or timed out
    },
}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://github.com/sdengine/sdengine/benchmarks/schema.json",
    "title": "sdengine benchmark record",
    "description": "Written by `sdengine bench`; one run: one workload, several backends.",
    "type": "object",
    "required": ["schema_version", "created", "device", "commit", "command", "workload", "results", "complete"],
    "properties": {
        "schema_version": {"enum": [1, SCHEMA_VERSION]},  # 1: the first GPU session's records
        "created": {"type": "string"},
        "device": {"type": "string", "minLength": 1},
        "device_type": {"enum": ["cuda", "cpu"]},
        "driver": {"type": ["string", "null"]},
        "versions": {"type": "object"},
        "commit": {"type": "string", "minLength": 1},
        "dirty": {"type": ["boolean", "null"]},
        "command": {"type": "string", "minLength": 1},
        "argv": {"type": "array", "items": {"type": "string"}},
        "workload": {
            "type": "object",
            "required": ["arch", "height", "width", "steps", "batch", "dtype"],
            "properties": {
                "arch": {"type": "string"},
                "height": {"type": "integer", "minimum": 1},
                "width": {"type": "integer", "minimum": 1},
                "steps": {"type": "integer", "minimum": 1},
                "batch": {"type": "integer", "minimum": 1},
                "dtype": {"enum": ["fp16", "bf16", "fp32"]},
                "guidance_scale": _NUMBER,
                "output_type": {"type": "string"},
                "model": {"type": ["string", "null"]},
                "sampler": {"type": "string"},  # of the end-to-end runs, every backend (sdengine's name)
                "schedule": {"type": "string"},
                "controlnets": {"type": "integer", "minimum": 0},  # ControlNets in the UNet step and end to end
                "hires_scale": {"type": "number", "minimum": 0},  # end to end with A1111's hires fix (0: off)
                "ip_adapters": {"type": "integer", "minimum": 0},  # end to end with IP-Adapters (0: off)
            },
        },
        "settings": {"type": "object"},
        "flop": {"type": "object"},
        "params": {"type": "object"},
        "peak_tflops": _OPTIONAL_NUMBER,
        "peak_tflops_source": {"type": "string"},
        # per dtype of the run's rows: {"tflops": ..., "source": ...}; the CPU's best matmul or convolution at `threads`
        "peak_tflops_by_dtype": {"type": "object"},
        "threads": {"type": "integer", "minimum": 1},  # CPU threads of every row's process (--threads)
        "baseline": {"type": ["string", "null"]},  # the diffusers row that speedup_vs_diffusers divides
        # end to end: the fastest sdengine row against each diffusers row and peer (times faster)
        "comparison": {"type": ["object", "null"]},
        "floor_ms": {"type": "object"},
        "results": {"type": "array", "items": {"oneOf": [MEASURED, SKIPPED]}},
        "backends": {  # per backend's process
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "properties": {
                    "load_s": _NUMBER, "prepare_s": _NUMBER, "prepare": {"type": "object"},
                    "exit": {"type": ["integer", "null"]},
                },
            },
        },
        "host_overhead": {"type": "object"},
        # each backend's image at a fixed prompt and seed against eager sdengine in fp32 on the same weights
        "fidelity": {"type": "object", "properties": {"mae": {"type": "object"}, "max_abs": {"type": "object"}}},  # per UNet: host time and aten ops of a forward on the meta device
        "complete": {"type": "boolean"},
        "interrupted": {"type": ["string", "null"]},
        "wall_s": _NUMBER,
    },
}


class ValidationError(ValueError):
    """A record that does not match the schema; the message names the offending key."""


def validate(record: dict, schema: dict = SCHEMA):
    """Raise ValidationError if `record` does not match the schema."""
    try:
        import jsonschema
    except ImportError:
        _check(record, schema, "record")
        return
    try:
        jsonschema.validate(record, schema)
    except jsonschema.ValidationError as e:
        where = "record" + "".join(f"[{p!r}]" for p in e.absolute_path)
        raise ValidationError(f"{where}: {e.message}") from None


# A fallback for machines without jsonschema: the keywords SCHEMA uses, nothing more.
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
          "integer": int, "number": (int, float)}


def _is_type(value, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[name])


def _check(value, schema: dict, where: str):
    if "const" in schema and value != schema["const"]:
        raise ValidationError(f"{where}: {value!r} was expected to be {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValidationError(f"{where}: {value!r} is not one of {schema['enum']}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in types):
            raise ValidationError(f"{where}: {value!r} is not of type {' or '.join(types)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < schema.get("minimum", value):
        raise ValidationError(f"{where}: {value} is less than the minimum of {schema['minimum']}")
    if isinstance(value, (str, list)) and len(value) < schema.get("minLength", schema.get("minItems", 0)):
        raise ValidationError(f"{where}: {value!r} is too short")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise ValidationError(f"{where}: {key!r} is a required property")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _check(value[key], sub, f"{where}[{key!r}]")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value.keys() - schema.get("properties", {}).keys():
                _check(value[key], extra, f"{where}[{key!r}]")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{where}[{i}]")
    if "oneOf" in schema:
        errors = []
        for option in schema["oneOf"]:
            try:
                _check(value, option, where)
            except ValidationError as e:
                errors.append(str(e))
        if len(errors) != len(schema["oneOf"]) - 1:
            raise ValidationError(f"{where}: matches {len(schema['oneOf']) - len(errors)} of the oneOf schemas, "
                                  f"not exactly one ({'; '.join(errors)})")


def schema_json() -> str:
    return json.dumps(SCHEMA, indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(schema_json())
