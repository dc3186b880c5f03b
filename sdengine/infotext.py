"""A1111's infotext: the `parameters` text that A1111 writes into a PNG (and into its API's `info`).

    info = parse_infotext(text)          # Infotext(prompt, negative_prompt, fields)
    kwargs = request_arguments(info)     # Request.from_args keywords; refuses what it cannot honour
    request = Request.from_infotext(text, init_image=...)   # the two in one (sdengine.request)
    text = format_infotext(params, seed, ...)   # what GenerationResult.infotext writes

The format (AUTOMATIC1111/stable-diffusion-webui, modules/processing.py create_infotext and
modules/infotext_utils.py parse_generation_parameters):

    a prompt, possibly
    on several lines
    Negative prompt: a negative prompt, possibly on several lines
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768

The last line holds the fields when it parses as at least three `key: value` pairs; a value
holding ',', ':' or a newline is quoted as a JSON string. A field that is absent has A1111's
meaning: no "Clip skip" is 1, no "RNG" is the GPU's generator, no "Schedule type" is
Automatic (the sampler's own schedule).

`request_arguments` honours every field that changes the image and that sdengine reproduces,
keeps the descriptive ones (model name and hashes, version) in `Infotext.fields` only, and
refuses every other field by name (an InvalidArgumentError whose parameter is "infotext"): it
never drops one silently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

from .errors import InvalidArgumentError

# One `key: value` pair of the fields line: a key starts with a word character and holds word
# characters, spaces, '-' and '/'; a value is a JSON string or runs to the next comma.
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?(?:-\w*?(\d+))?")

# Fields that describe the run but do not change the image sdengine draws.
DESCRIPTIVE = ("Model", "Model hash", "VAE", "VAE hash", "Version", "Lora hashes", "TI hashes", "Hashes",
               "Emphasis")
# What sdengine writes when a run followed diffusers' rules (A1111 would draw another image).
CONVENTIONS_FIELD = "Sampler conventions"

# A1111's defaults for what an infotext leaves out (its txt2img defaults, modules/ui.py and shared_options.py).
A1111_DEFAULT_STEPS = 20
A1111_DEFAULT_SAMPLER = "DPM++ 2M"
A1111_DEFAULT_CFG = 7.0
BETA_SCHEDULE_DEFAULT = 0.6  # A1111's beta_dist_alpha and beta_dist_beta


@dataclass
class Infotext:
    """A parsed infotext: the prompts and the fields of its last line, in their order, as text."""

    prompt: str
    negative_prompt: str
    fields: dict = field(default_factory=dict)


def parse_infotext(text: str) -> Infotext:
    """Split A1111's `parameters` text into prompt, negative prompt and fields (values unquoted,
    as text). The public parser behind Request.from_infotext and the server's /sdapi/v1/png-info."""
    if not isinstance(text, str):
        raise InvalidArgumentError("infotext", f"infotext must be text, got {type(text).__name__}")
    *lines, last = text.strip().split("\n")
    if len(_FIELD.findall(last)) < 3:  # no fields line: everything is prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {}
    for key, value in _FIELD.findall(last):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        fields[key.strip()] = value.strip() if isinstance(value, str) else value
    return Infotext("\n".join(prompt), "\n".join(negative), fields)


def _refuse(message: str):
    raise InvalidArgumentError("infotext", f"infotext {message}")


def _number(fields: dict, key: str, kind):
    try:
        return kind(fields[key])
    except ValueError:
        _refuse(f"field {key!r} must be a{'n integer' if kind is int else ' number'}, got {fields[key]!r}")


def _version(text: str) -> Optional[tuple]:
    """(major, minor, patch, commits past the tag) of an A1111 version such as "v1.7.0-225-g...";
    None when it is not one."""
    m = _VERSION.match(text.strip())
    if not m:
        return None
    return tuple(int(g) if g else 0 for g in m.groups())


def request_arguments(info: Infotext) -> dict:
    """Request.from_args keywords that draw the image `info` describes, under A1111's rules
    unless its "Sampler conventions" field says diffusers. Raises InvalidArgumentError naming
    every field that sdengine cannot honour."""
    from .samplers.names import A1111_SAMPLER_DEFAULT_SCHEDULE, split_a1111_label

    fields = dict(info.fields)
    handled = set(DESCRIPTIVE)
    args: dict = {"prompt": info.prompt, "prompt_syntax": "a1111"}
    if info.negative_prompt:
        args["negative_prompt"] = info.negative_prompt

    def take(key, kind, default=None):
        handled.add(key)
        return default if key not in fields else _number(fields, key, kind)

    args["steps"] = take("Steps", int, A1111_DEFAULT_STEPS)
    args["guidance_scale"] = take("CFG scale", float, A1111_DEFAULT_CFG)
    seed = take("Seed", int)
    if seed is not None:
        args["seed"] = seed
    handled.update(("Size", "Sampler", "Schedule type", "RNG", CONVENTIONS_FIELD, "Seed resize from",
                    "Beta schedule alpha", "Beta schedule beta"))
    if "Size" in fields:
        m = _SIZE.match(str(fields["Size"]))
        if not m:
            _refuse(f"field 'Size' must be WIDTHxHEIGHT, got {fields['Size']!r}")
        args["width"], args["height"] = int(m.group(1)), int(m.group(2))

    conventions = str(fields.get(CONVENTIONS_FIELD, "a1111")).lower()
    if conventions not in ("a1111", "diffusers"):
        _refuse(f"field {CONVENTIONS_FIELD!r} must be a1111 or diffusers, got {fields[CONVENTIONS_FIELD]!r}")
    args["conventions"] = conventions
    sampler, implied = split_a1111_label(str(fields.get("Sampler", A1111_DEFAULT_SAMPLER)))
    schedule = fields.get("Schedule type")
    schedule = None if schedule in (None, "", "Automatic") else str(schedule)
    if implied is not None and schedule is not None and implied.lower() != schedule.lower():
        _refuse(f"fields 'Sampler: {fields['Sampler']}' and 'Schedule type: {schedule}' disagree")
    schedule = schedule or implied
    version = _version(str(fields["Version"])) if "Version" in fields else None
    if conventions == "a1111" and version is not None:
        if version < (1, 7, 0, 225):
            _refuse(f"is from A1111 {fields['Version']}, whose alphas_cumprod were float16 ('Downcast "
                    f"alphas_cumprod'); sdengine draws what A1111 1.7.0-225 and later draw")
        if version < (1, 9, 0, 0) and schedule is None and A1111_SAMPLER_DEFAULT_SCHEDULE.get(sampler):
            schedule = "Uniform"  # before 1.9 a sampler label without a schedule used the model's sigmas
    args["sampler"], args["schedule"] = sampler, schedule
    for key in ("Beta schedule alpha", "Beta schedule beta"):
        if key in fields and _number(fields, key, float) != BETA_SCHEDULE_DEFAULT:
            _refuse(f"field {key!r} is {fields[key]}; sdengine's Beta schedule has A1111's default "
                    f"{BETA_SCHEDULE_DEFAULT}")

    clip_skip = take("Clip skip", int, 1)
    if clip_skip > 1:  # A1111 counts the last layer too: its "Clip skip: 2" is diffusers' clip_skip=1
        args["clip_skip"] = clip_skip - 1
    # A1111: no RNG field is its default, the GPU's generator; sdengine writes CPU or NV
    args["rng"] = str(fields.get("RNG", "GPU")).lower()
    ensd = take("ENSD", int, 0)
    if ensd:
        args["eta_noise_seed_delta"] = ensd
    strength = take("Variation seed strength", float, 0.0)
    subseed = take("Variation seed", int)
    if strength:
        args["subseed_strength"] = strength
        args["subseed"] = subseed
    if "Seed resize from" in fields:
        m = _SIZE.match(str(fields["Seed resize from"]))
        if not m:
            _refuse(f"field 'Seed resize from' must be WIDTHxHEIGHT, got {fields['Seed resize from']!r}")
        args["seed_resize_from_w"], args["seed_resize_from_h"] = int(m.group(1)), int(m.group(2))
    handled.add("Prompt syntax")
    if "Prompt syntax" in fields:  # sdengine writes "plain" for a prompt it read as plain text
        if fields["Prompt syntax"] not in ("plain", "a1111"):
            _refuse(f"field 'Prompt syntax' must be plain or a1111, got {fields['Prompt syntax']!r}")
        args["prompt_syntax"] = None if fields["Prompt syntax"] == "plain" else "a1111"
    eta = take("Eta", float)
    eta_ddim = take("Eta DDIM", float)
    if eta is not None or eta_ddim is not None:
        args["eta"] = eta_ddim if eta_ddim is not None else eta
    strength = take("Denoising strength", float)
    hires = _hires(fields, handled, strength)
    if hires is not None:  # txt2img with the hires fix: its denoising strength is the second pass's
        args["hires"] = hires
    elif strength is not None:
        args["strength"] = strength
    # training-free acceleration (sdengine/acceleration.py): A1111's own "Token merging ratio", sdengine's others
    interval, branch = take("DeepCache interval", int, 0), take("DeepCache branch", int, 0)
    if interval:
        from .acceleration import DeepCache

        args["deepcache"] = DeepCache(interval=interval, branch=branch)
    gate_step = take("T-GATE gate step", int, 0)
    if gate_step:
        args["tgate"] = gate_step
    ratio = take("Token merging ratio", float, 0.0)
    if ratio:
        args["tome"] = ratio
    if "Refiner" in fields:  # the refiner is a model: Request.from_infotext needs refiner= for it
        handled.update(("Refiner", "Refiner switch at"))
        args["refiner_switch_at"] = _number(fields, "Refiner switch at", float) if "Refiner switch at" in fields \
            else 0.8

    refused = [key for key in fields if key not in handled]
    if refused:
        _refuse(f"field{'s' if len(refused) > 1 else ''} {', '.join(map(repr, refused))} cannot be honoured by "
                f"sdengine (it would draw another image); remove {'them' if len(refused) > 1 else 'it'} to draw "
                f"without {'them' if len(refused) > 1 else 'it'}")
    return args


def _hires(fields: dict, handled: set, strength: Optional[float]):
    """The sdengine.Hires of A1111's hires fields ("Hires upscale" or "Hires resize", "Hires steps",
    "Hires upscaler", "Hires sampler", "Hires prompt", "Hires negative prompt"), or None."""
    keys = ("Hires upscale", "Hires resize", "Hires steps", "Hires upscaler", "Hires sampler", "Hires prompt",
            "Hires negative prompt")
    if not any(key in fields for key in keys):
        return None
    from .hires import Hires

    handled.update(keys)
    resize = (0, 0)
    if "Hires resize" in fields:
        m = _SIZE.match(str(fields["Hires resize"]))
        if not m:
            _refuse(f"field 'Hires resize' must be WIDTHxHEIGHT, got {fields['Hires resize']!r}")
        resize = (int(m.group(1)), int(m.group(2)))
    text = lambda key: str(fields[key]) if key in fields else None  # noqa: E731
    return Hires(scale=_number(fields, "Hires upscale", float) if "Hires upscale" in fields else 2.0,
                 upscaler=text("Hires upscaler") or "Latent",
                 steps=_number(fields, "Hires steps", int) if "Hires steps" in fields else 0,
                 denoising_strength=0.7 if strength is None else strength, resize_x=resize[0], resize_y=resize[1],
                 sampler=text("Hires sampler"), prompt=text("Hires prompt"),
                 negative_prompt=text("Hires negative prompt"))


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def quote(value: Optional[str]) -> Optional[str]:
    """An infotext value as A1111 writes it: quoted (JSON) when it holds ',', ':' or a newline."""
    if value is None or not any(c in value for c in ",:\n"):
        return value
    return json.dumps(value, ensure_ascii=False)


def bare(name: str) -> str:
    """A name inside an infotext list value: A1111 drops ':' and ','."""
    return name.replace(":", "").replace(",", "")


def format_infotext(prompt: str, negative_prompt: str, fields: list) -> str:
    """The text of a prompt, a negative prompt and (key, value) fields, None values left out."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)
