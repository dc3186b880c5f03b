"""The OpenAPI schema at /openapi.json: a request the schema calls valid is one the server serves.

FastAPI writes the schema from the pydantic models (schemas.py); `openapi_schema` completes it
with what depends on this server and its model, each stated where a client reads it:
- the caps (ServeSettings: --max-size, --max-steps, --max-batch-size, --max-batch-count) as
  `maximum`, the model's native size as the `default` of width and height, its text encoder's
  depth as the `maximum` of CLIP_stop_at_last_layers, its name as sd_model_checkpoint's `enum`;
- the sampler and schedule names the server takes (`accepted_names`) as `enum`, and the pairs
  that do not go together (a schedule a sampler cannot follow, a multistep sampler's fewest
  steps, A1111's variation seeds) as the branches of an `anyOf`, derived from the functions
  that refuse them (requests.sampler_and_schedule, samplers.plan_for);
- images (init_images, mask, png-info's image) as strings of the format "base64-image": a
  base64 image (or a data: URL) that PIL can read;
- every status code the server answers: 400 (a body that is not text), 401 (with --api-key),
  413 (over --max-body-mb), 422, 500, 503 (busy, Retry-After), 504 (timeout); /metrics as
  Prometheus text.

tests/test_serve_openapi.py runs schemathesis (--checks all) against it.
"""

from __future__ import annotations

import copy
import functools

from .. import samplers
from ..samplers.names import SAMPLER_TABLE
from .requests import Limits, accepted_names, check_plan, default_steps, sampler_and_schedule
from .schemas import Img2ImgRequest, OverrideSettings, PngInfoRequest, TaskProgressRequest, Txt2ImgRequest

IMAGE_FORMAT = "base64-image"
AUTOMATIC = ("", "automatic", "Automatic")  # a scheduler value that means "the sampler's own"

_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorDetail"}}}}
_GENERATION_ERRORS = {
    "400": ("The body is not text (text that is not JSON is a 422)", _ERROR),
    "413": ("The body is over --max-body-mb", _ERROR),
    "500": ("The model failed; the server goes on", _ERROR),
    "503": ("Busy (the queue is full) or the model is unavailable; retry after Retry-After seconds",
            dict(_ERROR, headers={"Retry-After": {"schema": {"type": "integer"}}})),
    "504": ("The request outlived --request-timeout", _ERROR),
}


def openapi_schema(base: dict, limits, info, api_key: bool) -> dict:
    """FastAPI's schema `base`, completed for these limits (requests.Limits) and this model
    (requests.ModelInfo)."""
    schema = copy.deepcopy(base)
    components = schema["components"]["schemas"]
    for model in (Txt2ImgRequest, Img2ImgRequest, OverrideSettings, TaskProgressRequest, PngInfoRequest):
        # pydantic's own schema: FastAPI's copy writes bounds as floats (2**63 - 1 becomes 2**63)
        exact = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components[model.__name__]["properties"] = exact["properties"]
    components["ErrorDetail"] = {"type": "object", "properties": {"detail": {}}, "required": ["detail"]}
    _, schedule_names = accepted_names()
    cfg = info.config
    max_steps = min(limits.max_steps, cfg.scheduler.num_train_timesteps) if cfg is not None else limits.max_steps
    profiles = sampler_profiles(info, max_steps)
    branches = _sampler_branches(profiles)
    for name in ("Txt2ImgRequest", "Img2ImgRequest"):
        props = components[name]["properties"]
        for field, cap in (("width", limits.max_size), ("height", limits.max_size), ("steps", max_steps),
                           ("batch_size", limits.max_batch_size), ("n_iter", limits.max_batch_count)):
            _value_branch(props[field])["maximum"] = cap
        props["width"]["default"] = props["height"]["default"] = info.default_size
        props["steps"]["default"] = default_steps(limits)
        for field in ("sampler_name", "sampler_index"):
            _value_branch(props[field])["enum"] = ["", *sorted(profiles)]
        _value_branch(props["scheduler"])["enum"] = sorted(schedule_names)
        components[name]["anyOf"] = copy.deepcopy(branches)
        _value_branch(props["refiner_checkpoint"])["enum"] = ["", "None", *info.refiners]
        props["alwayson_scripts"] = _alwayson_scripts(info)
    txt2img = components["Txt2ImgRequest"]["properties"]  # the hires fix's caps and names
    _value_branch(txt2img["hr_second_pass_steps"])["maximum"] = max_steps
    for field in ("hr_resize_x", "hr_resize_y"):  # 0, or a side in [8, --max-size]
        for branch in txt2img[field]["anyOf"]:
            if "minimum" in branch:
                branch["maximum"] = limits.max_size
    _value_branch(txt2img["hr_sampler_name"])["enum"] = ["", *sorted(n for n in profiles if _serves(
        samplers.resolve, n, None, info.scheduler_config))]
    _value_branch(txt2img["hr_checkpoint_name"])["enum"] = sorted({"", info.title, info.filename})
    txt2img["enable_hr"]["description"] = (
        "A1111's hires fix: besides each field's range, the second pass's sides must be within "
        f"--max-size ({limits.max_size}) and its schedule one the hires sampler runs (a 422 names the field)")
    img2img = components["Img2ImgRequest"]["properties"]
    img2img["init_images"]["items"]["format"] = IMAGE_FORMAT
    img2img["init_images"]["maxItems"] = limits.max_batch_size * limits.max_batch_count
    if info.is_inpaint:
        img2img["mask"] = {"type": "string", "format": IMAGE_FORMAT, "description": "white = repaint"}
        components["Img2ImgRequest"].setdefault("required", []).append("mask")
    else:
        img2img["mask"] = {"anyOf": [{"const": ""}, {"type": "null"}], "default": None,
                           "description": f"{info.title} is not an inpainting model: no mask"}
    components["PngInfoRequest"]["properties"]["image"]["format"] = IMAGE_FORMAT
    if not str(info.device).startswith("cuda"):  # A1111's "GPU" source is CUDA's generator
        sources = _value_branch(components["OverrideSettings"]["properties"]["randn_source"])
        sources["enum"] = [s for s in sources["enum"] if s.lower() != "gpu"]
    override = components["OverrideSettings"]["properties"]
    _value_branch(override["sd_model_checkpoint"])["enum"] = sorted({"", info.title, info.filename})
    if cfg is not None:
        encoders = [e for e in (cfg.text_encoder, cfg.text_encoder_2) if e is not None]
        most = min(e.num_hidden_layers - 1 - (e.output_layer == "penultimate") for e in encoders)
        _value_branch(override["CLIP_stop_at_last_layers"])["maximum"] = most + 1  # clip_skip + 1
        _value_branch(override["deepcache_branch"])["maximum"] = 3 * len(cfg.unet.block_out_channels) - 1
    _document_statuses(schema, api_key)
    return schema


def _alwayson_scripts(info) -> dict:
    """alwayson_scripts: A1111's ControlNet extension only, whose enabled units with an image are
    IP-Adapter units naming a loaded adapter or ControlNet units naming a loaded ControlNet
    (requests.extension_units); none without either."""
    import re

    from .requests import CONTROLNET_MODULES, CONTROLNET_SCRIPT, RESIZE_MODES

    no_image = {"enum": ["", None]}
    image = {"type": "string", "format": IMAGE_FORMAT}
    # A1111's ControlNet API also sends {"image": base64, "mask": base64}; sdengine serve takes no mask
    unit_image = {"anyOf": [image, {"type": "object", "required": ["image"],
                                    "properties": {"image": image, "mask": no_image}}]}
    units = [{"not": {"type": "object"}},  # ignored, as are disabled units and units without an image
             {"type": "object", "properties": {"enabled": {"enum": [False, None]}}, "required": ["enabled"]},
             {"type": "object", "properties": {name: {"anyOf": [no_image, {"type": "object", "properties": {
                 "image": no_image, "mask": no_image}}]} for name in ("image", "input_image")}}]

    def model(names) -> dict:  # "name", or A1111's "name [hash]" (requests: the text before " [")
        pattern = "|".join(re.escape(name) for name in names)
        return {"type": "string", "pattern": f"^({pattern})( \\[.*)?$", "examples": list(names)}

    weight = {"type": ["number", "null"]}
    if info.ip_adapters:
        units.append({"type": "object", "required": ["module", "model", "image"], "properties": {
            "enabled": {"const": True}, "module": {"type": "string", "pattern": "^ip-adapter"},
            "model": model(info.ip_adapters), "weight": weight, "mask": no_image,
            "image": unit_image, "input_image": {"anyOf": [unit_image, no_image]},
            "guidance_start": {"enum": [0, None]}, "guidance_end": {"enum": [1, None]}}})
    if info.controlnets:
        fraction = {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]}
        units.append({"type": "object", "required": ["model", "image"], "properties": {
            "enabled": {"const": True}, "module": {"enum": ["", None, *CONTROLNET_MODULES]},
            "model": model([name for name, _ in info.controlnets]), "weight": weight, "mask": no_image,
            "image": unit_image, "input_image": {"anyOf": [unit_image, no_image]},
            "guidance_start": fraction, "guidance_end": fraction,
            "control_mode": {"enum": [0, 2, "Balanced", "ControlNet is more important", None]},
            "resize_mode": {"enum": [v for spellings in RESIZE_MODES for v in spellings]},
            "hr_option": {"enum": ["Both", "", None]}},
            "description": "A ControlNet unit: the image is the control map as sent (module none), fitted to "
                           "the output size by resize_mode as the extension does it (Just Resize stretches, "
                           "Crop and Resize covers and crops, Resize and Fill fits and pads); weight scales its "
                           "residuals; it runs from guidance_start to guidance_end (fractions of the run; "
                           "guidance_start must not be after guidance_end: a 422 names it). processor_res, "
                           "threshold_a/b, pixel_perfect and low_vram play no "
                           "part without a preprocessor. GET /controlnet/model_list lists the models."})
    script = {"type": "object", "properties": {"args": {"type": ["array", "null"], "items": {"anyOf": units}}}}
    return {"anyOf": [{"type": "object", "propertyNames": {"enum": list(CONTROLNET_SCRIPT)},
                       "additionalProperties": script}, {"type": "null"}], "default": {},
            "description": "A1111's ControlNet extension's units: IP-Adapter units (sdengine serve --ip-adapter) "
                           "and ControlNet units (sdengine serve --controlnet)"}


def _value_branch(prop: dict) -> dict:
    """The non-null branch of an Optional field's schema (pydantic writes anyOf [X, null])."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "null":
            return branch
    raise ValueError(f"no value branch in {prop}")


def sampler_profiles(info, max_steps: int) -> dict:
    """What each accepted sampler name allows on this model, found by asking the functions that
    refuse it (requests.sampler_and_schedule, samplers.plan_for): {name: (schedules it cannot
    follow, its fewest steps, whether it takes A1111's variation seeds)}. Names this model
    cannot run at all (with any schedule, within max_steps) are left out."""
    from types import SimpleNamespace

    sampler_names, schedule_names = accepted_names()
    profiles = {}
    for spelling in sorted(sampler_names - {""}):
        request = functools.partial(SimpleNamespace, sampler_name=spelling, sampler_index=None)

        def runs(scheduler, steps: int) -> bool:  # what make_spec asks, in its order
            try:
                sampler, schedule, conventions = sampler_and_schedule(request(scheduler=scheduler),
                                                                      info.scheduler_config)
                check_plan(sampler, schedule, steps, info.scheduler_config, conventions)
                return True
            except ValueError:
                return False

        fewest = next((steps for steps in range(1, max_steps + 1) if runs(None, steps)), None)
        if fewest is None:
            continue
        bad = frozenset(s for s in schedule_names if not runs(s, max(fewest, default_steps_of(max_steps))))
        _, _, conventions = sampler_and_schedule(request(scheduler=None), info.scheduler_config)
        profiles[spelling] = (bad, fewest, conventions == "a1111")
    return profiles


def default_steps_of(max_steps: int) -> int:
    return default_steps(Limits(max_steps=max_steps))


def _sampler_branches(profiles: dict) -> list:
    """The profiles as one anyOf: a branch per set of names that allow the same, for the name
    given as sampler_name, or as sampler_index when sampler_name is unset, plus the branch of a
    request that names none (sampler_index's default, "Euler"). Each branch is a plain
    conjunction (no if/not, no anyOf inside allOf), the form schemathesis generates from."""
    _, schedule_names = accepted_names()
    groups: dict = {}
    for spelling, profile in profiles.items():
        groups.setdefault(profile, []).append(spelling)
    unset = {"enum": [None, ""]}
    default = "Euler"  # sampler_index's default: what a request that names no sampler runs
    branches = []
    for (bad, fewest, variation_seeds), spellings in sorted(groups.items(), key=lambda kv: kv[1]):
        holds: dict = {}
        if bad:
            holds["scheduler"] = {"anyOf": [{"enum": sorted(schedule_names - bad)}, {"type": "null"}]}
        if fewest > 1:
            holds["steps"] = {"anyOf": [{"type": "integer", "minimum": fewest}, {"type": "null"}]}
        if not variation_seeds:
            holds["subseed_strength"] = {"anyOf": [{"type": "number", "minimum": 0, "maximum": 0}, {"type": "null"}]}
        said = ([f"not with the schedules {sorted(bad)}"] if bad else []) + (
            [f"at least {fewest} steps"] if fewest > 1 else []) + (
            [] if variation_seeds else ["no variation seeds (subseed_strength 0: they follow A1111's rules)"])
        description = f"{', '.join(spellings)}: {'; '.join(said) or 'any schedule and step count'}"
        names = {"enum": spellings}
        branches.append({"properties": {"sampler_name": names, **holds}, "required": ["sampler_name"],
                         "description": description})
        branches.append({"properties": {"sampler_name": unset, "sampler_index": names, **holds},
                         "required": ["sampler_index"], "description": description + " (as sampler_index)"})
        if default in spellings:
            branches.append({"properties": {"sampler_name": unset, "sampler_index": unset, **holds},
                             "description": description + f" (no sampler named: {default})"})
    return branches


def _serves(check, *args) -> bool:
    """Whether check(*args) passes (FieldError is a ValueError too)."""
    try:
        check(*args)
        return True
    except ValueError:
        return False


def _document_statuses(schema: dict, api_key: bool):
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            if method == "post":
                statuses = dict(_GENERATION_ERRORS) if path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img") else {
                    k: v for k, v in _GENERATION_ERRORS.items() if k in ("400", "413")}
                statuses["422"] = responses.get("422") or ("Validation error", _ERROR)
                for status, entry in statuses.items():
                    if isinstance(entry, tuple):
                        description, body = entry
                        responses.setdefault(status, {"description": description, **copy.deepcopy(body)})
            if path.startswith(("/sdapi", "/internal")):
                responses.setdefault("503", {"description": "The model is not loaded yet, or busy",
                                             **copy.deepcopy(_ERROR)})
            if api_key:
                responses.setdefault("401", {"description": "Missing or wrong bearer token (--api-key)",
                                             **copy.deepcopy(_ERROR)})
    metrics = schema["paths"].get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"]["200"] = {"description": "Prometheus text format",
                                       "content": {"text/plain": {"schema": {"type": "string"}}}}
    if api_key:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
