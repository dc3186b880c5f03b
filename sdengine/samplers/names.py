"""The one table of sampler and schedule names, shared by the Python API, the CLI and the C runtime.

Data only (plain dicts of strings), so that it can be dumped for the C runtime with
`python -c "import json, sdengine.samplers.names as n; print(json.dumps(n.NAMES))"`.
Keys are *normalized* names:

    normalize(name) = lower-case name, with "_" and "-" replaced by " " and runs of
                      whitespace collapsed to one space, stripped at both ends.

A name is resolved in this order (sdengine.samplers.resolve does it):
  1. normalize(name) is a key of NAMES["samplers"]             -> (sampler, None)
  2. it ends in " " + a key of NAMES["schedules"] (keys tried in table order) and the
     part before that is a key of NAMES["samplers"]            -> (sampler, schedule)
     ("DPM++ 2M SDE Karras", "dpmpp_2m_karras", "Euler a exponential")
Schedule names given on their own are looked up in NAMES["schedules"].
Values are the canonical sdengine names (SAMPLERS / SCHEDULES below, re-exported by
sdengine.samplers).
"""

NAMES = {
    "samplers": {
        # canonical names
        "ddim": "ddim",
        "ddpm": "ddpm",
        "pndm": "pndm",
        "lms": "lms",
        "euler": "euler",
        "euler a": "euler_a",
        "heun": "heun",
        "dpm 2": "dpm_2",
        "dpm 2 a": "dpm_2_a",
        "dpmpp 2m": "dpmpp_2m",
        "dpmpp 2m sde": "dpmpp_2m_sde",
        "dpmpp sde": "dpmpp_sde",
        "dpmpp 3m sde": "dpmpp_3m_sde",
        "unipc": "unipc",
        "lcm": "lcm",
        # A1111 display names
        "plms": "pndm",
        "dpm2": "dpm_2",
        "dpm2 a": "dpm_2_a",
        "dpm++ 2m": "dpmpp_2m",
        "dpm++ 2m sde": "dpmpp_2m_sde",
        "dpm++ sde": "dpmpp_sde",
        "dpm++ 3m sde": "dpmpp_3m_sde",
        # A1111 internal (k-diffusion) names
        "k lms": "lms",
        "k euler": "euler",
        "k euler a": "euler_a",
        "k euler ancestral": "euler_a",
        "k heun": "heun",
        "k dpm 2": "dpm_2",
        "k dpm 2 a": "dpm_2_a",
        "k dpm 2 ancestral": "dpm_2_a",
        "k dpmpp 2m": "dpmpp_2m",
        "k dpmpp 2m sde": "dpmpp_2m_sde",
        "k dpmpp sde": "dpmpp_sde",
        "k dpmpp 3m sde": "dpmpp_3m_sde",
        # ComfyUI names
        "euler ancestral": "euler_a",
        "dpm 2 ancestral": "dpm_2_a",
        "dpmpp sde gpu": "dpmpp_sde",
        "dpmpp 2m sde gpu": "dpmpp_2m_sde",
        "dpmpp 3m sde gpu": "dpmpp_3m_sde",
        "uni pc": "unipc",
        "uni pc bh2": "unipc",
        # diffusers scheduler class names (lower-cased)
        "ddimscheduler": "ddim",
        "ddpmscheduler": "ddpm",
        "pndmscheduler": "pndm",
        "lmsdiscretescheduler": "lms",
        "eulerdiscretescheduler": "euler",
        "eulerancestraldiscretescheduler": "euler_a",
        "heundiscretescheduler": "heun",
        "kdpm2discretescheduler": "dpm_2",
        "kdpm2ancestraldiscretescheduler": "dpm_2_a",
        "dpmsolvermultistepscheduler": "dpmpp_2m",
        "dpmsolversdescheduler": "dpmpp_sde",
        "unipcmultistepscheduler": "unipc",
        "lcmscheduler": "lcm",
    },
    "schedules": {
        "default": "default",
        "automatic": "default",
        "normal": "normal",
        "karras": "karras",
        "exponential": "exponential",
        "sgm uniform": "sgm_uniform",
        "simple": "simple",
        "ddim uniform": "ddim_uniform",
        "uniform": "ddim_uniform",
    },
}


# The samplers and schedules themselves, one row each, in the order of A1111's lists
# (/sdapi/v1/samplers, /sdapi/v1/schedulers): the canonical name (a value of NAMES), how A1111
# labels it (the PNG `parameters` text: "Sampler: Euler a", "Schedule type: Karras"; each label
# resolves back to its name through NAMES) and what A1111's API lists with it. A new sampler
# or schedule is a row here, its spellings in NAMES, and (samplers) its step in
# sdengine.samplers.STEP_FACTORIES.
SAMPLER_TABLE = (
    # name          A1111 label      A1111 API aliases
    ("dpmpp_2m",     "DPM++ 2M",      ("k_dpmpp_2m",)),
    ("dpmpp_sde",    "DPM++ SDE",     ("k_dpmpp_sde",)),
    ("dpmpp_2m_sde", "DPM++ 2M SDE",  ("k_dpmpp_2m_sde",)),
    ("dpmpp_3m_sde", "DPM++ 3M SDE",  ("k_dpmpp_3m_sde",)),
    ("euler_a",      "Euler a",       ("k_euler_a",)),
    ("euler",        "Euler",         ("k_euler",)),
    ("lms",          "LMS",           ("k_lms",)),
    ("heun",         "Heun",          ("k_heun",)),
    ("dpm_2",        "DPM2",          ("k_dpm_2",)),
    ("dpm_2_a",      "DPM2 a",        ("k_dpm_2_a",)),
    ("ddim",         "DDIM",          ("ddim",)),
    ("ddpm",         "DDPM",          ("ddpm",)),
    ("pndm",         "PLMS",          ("plms",)),
    ("unipc",        "UniPC",         ("unipc",)),
    ("lcm",          "LCM",           ("k_lcm",)),
)
SCHEDULE_TABLE = (
    # name          A1111 label      A1111 API name   default rho
    ("default",      "Automatic",     "automatic",     None),
    ("ddim_uniform", "Uniform",       "uniform",       None),
    ("karras",       "Karras",        "karras",        7.0),
    ("exponential",  "Exponential",   "exponential",   None),
    ("sgm_uniform",  "SGM Uniform",   "sgm_uniform",   None),
    ("simple",       "Simple",        "simple",        None),
    ("normal",       "Normal",        "normal",        None),
)

# The canonical names, in the order NAMES first gives them (the engine's order).
SAMPLERS = tuple(dict.fromkeys(NAMES["samplers"].values()))
SCHEDULES = tuple(dict.fromkeys(NAMES["schedules"].values()))
for _table, _rows, _names in (("SAMPLER_TABLE", SAMPLER_TABLE, SAMPLERS), ("SCHEDULE_TABLE", SCHEDULE_TABLE, SCHEDULES)):
    if sorted(row[0] for row in _rows) != sorted(_names):
        raise ValueError(f"names.py: {_table} and NAMES name different samplers or schedules")

# How A1111 writes each canonical name (sdengine.pipeline's infotext).
A1111_LABELS = {
    "samplers": {name: label for name, label, _ in SAMPLER_TABLE},
    "schedules": {name: label for name, label, _, _ in SCHEDULE_TABLE},
}
