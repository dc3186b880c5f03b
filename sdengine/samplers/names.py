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
        # A1111's "Uniform" is the model's own sigmas at evenly spaced timesteps (diffusers' linspace);
        # its "DDIM" schedule is the DDIM timesteps 1, 1 + T // n, ... (leading, offset 1)
        "uniform": "normal",
        "ddim": "ddim_uniform",
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
    ("ddim_uniform", "DDIM",          "ddim",          None),   # A1111's "Uniform" is diffusers' linspace ("normal")
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


# ---------------------------------------------------------------------------
# A1111's rules (sdengine/samplers/a1111.py): its sampler and schedule labels, and what each
# label runs. From AUTOMATIC1111/stable-diffusion-webui modules/sd_samplers_kdiffusion.py
# (samplers_k_diffusion), sd_samplers_timesteps.py, sd_samplers_lcm.py and sd_schedulers.py.
# ---------------------------------------------------------------------------

# label -> (sdengine sampler, A1111's options: "scheduler" = its Automatic schedule,
# "discard" = discard_next_to_last_sigma, "brownian" = SDE noise from a Brownian tree,
# "ensd" = A1111 writes ENSD into the infotext for it (uses_ensd), "second_order" = two model
# evaluations a step, "eta" = its eta option's default), in the order of A1111's list)
A1111_SAMPLERS = {
    "DPM++ 2M": ("dpmpp_2m", {"scheduler": "karras"}),
    "DPM++ SDE": ("dpmpp_sde", {"scheduler": "karras", "brownian": True, "second_order": True, "eta": 1.0}),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", {"scheduler": "exponential", "brownian": True, "eta": 1.0}),
    "DPM++ 2M SDE Heun": ("dpmpp_2m_sde_heun", {"scheduler": "exponential", "brownian": True, "eta": 1.0}),
    "DPM++ 2S a": ("dpmpp_2s_a", {"scheduler": "karras", "ensd": True, "second_order": True, "eta": 1.0}),
    "DPM++ 3M SDE": ("dpmpp_3m_sde", {"scheduler": "exponential", "discard": True, "brownian": True, "eta": 1.0}),
    "Euler a": ("euler_a", {"ensd": True, "eta": 1.0}),
    "Euler": ("euler", {}),
    "LMS": ("lms", {}),
    "Heun": ("heun", {"second_order": True}),
    "DPM2": ("dpm_2", {"scheduler": "karras", "discard": True, "second_order": True}),
    "DPM2 a": ("dpm_2_a", {"scheduler": "karras", "discard": True, "ensd": True, "second_order": True, "eta": 1.0}),
    "DPM fast": ("dpm_fast", {"ensd": True, "eta": 1.0}),
    "DPM adaptive": ("dpm_adaptive", {"ensd": True, "eta": 1.0}),
    "Restart": ("restart", {"scheduler": "karras", "second_order": True}),
    "DDIM": ("ddim", {"timesteps": True, "eta": 0.0}),
    "DDIM CFG++": ("ddim_cfgpp", {"timesteps": True, "eta": 0.0}),
    "PLMS": ("pndm", {"timesteps": True}),
    "UniPC": ("unipc", {"timesteps": True}),
    "LCM": ("lcm", {}),
}
# A1111's other names for its samplers (its aliases, and the labels of A1111 before 1.9 that
# carried a schedule are split by split_a1111_label).
A1111_SAMPLER_ALIASES = {
    "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_sde": "DPM++ SDE", "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "k_dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "k_dpmpp_2s_a": "DPM++ 2S a", "k_dpmpp_3m_sde": "DPM++ 3M SDE",
    "k_euler_a": "Euler a", "k_euler_ancestral": "Euler a", "k_euler": "Euler", "k_lms": "LMS", "k_heun": "Heun",
    "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a", "k_dpm_fast": "DPM fast", "k_dpm_ad": "DPM adaptive",
    "restart": "Restart", "ddim": "DDIM", "ddim_cfgpp": "DDIM CFG++", "plms": "PLMS", "unipc": "UniPC",
    "k_lcm": "LCM",
}
# label -> sdengine name of A1111's schedules (sd_schedulers.py); "Automatic" is the sampler's own.
A1111_SCHEDULES = {
    "Automatic": "automatic", "Uniform": "uniform", "Karras": "karras", "Exponential": "exponential",
    "Polyexponential": "polyexponential", "SGM Uniform": "sgm_uniform", "KL Optimal": "kl_optimal",
    "Align Your Steps": "align_your_steps", "Simple": "simple", "Normal": "normal", "DDIM": "ddim", "Beta": "beta",
}
# A1111's schedules as /sdapi/v1/schedulers lists them (modules/sd_schedulers.py):
# (name, label, aliases, default_rho, need_inner_model)
A1111_SCHEDULE_TABLE = (
    ("automatic",        "Automatic",        None,            -1.0, False),
    ("uniform",          "Uniform",          None,            -1.0, True),
    ("karras",           "Karras",           None,            7.0,  False),
    ("exponential",      "Exponential",      None,            -1.0, False),
    ("polyexponential",  "Polyexponential",  None,            1.0,  False),
    ("sgm_uniform",      "SGM Uniform",      ("SGMUniform",), -1.0, True),
    ("kl_optimal",       "KL Optimal",       None,            -1.0, False),
    ("align_your_steps", "Align Your Steps", None,            -1.0, False),
    ("simple",           "Simple",           None,            -1.0, True),
    ("normal",           "Normal",           None,            -1.0, True),
    ("ddim",             "DDIM",             None,            -1.0, True),
    ("beta",             "Beta",             None,            -1.0, True),
)
if [(name, label) for name, label, *_ in A1111_SCHEDULE_TABLE] != [(n, l) for l, n in A1111_SCHEDULES.items()]:
    raise ValueError("names.py: A1111_SCHEDULE_TABLE and A1111_SCHEDULES disagree")
A1111_SCHEDULE_ALIASES = {"SGMUniform": "SGM Uniform", **{name: label for label, name in A1111_SCHEDULES.items()},
                          **{label: label for label in A1111_SCHEDULES}}
# The sdengine names of A1111's samplers that step in VP latents over its DDIM timesteps
# (sd_samplers_timesteps.py; UniPC in continuous time between them).
A1111_TIMESTEP_SAMPLERS = ("ddim", "ddim_cfgpp", "pndm", "unipc")
# A1111's samplers as /sdapi/v1/samplers lists them: (label, aliases, options in A1111's words)
_A1111_OPTION_NAMES = {"scheduler": "scheduler", "discard": "discard_next_to_last_sigma",
                       "brownian": "brownian_noise", "ensd": "uses_ensd", "second_order": "second_order"}
A1111_SAMPLER_LIST = tuple(
    (label, tuple(alias for alias, of in A1111_SAMPLER_ALIASES.items() if of == label),
     {**{_A1111_OPTION_NAMES[k]: v for k, v in options.items() if k in _A1111_OPTION_NAMES},
      **({"solver_type": "heun"} if label == "DPM++ 2M SDE Heun" else {})})
    for label, (_, options) in A1111_SAMPLERS.items())
# Each sampler label's Automatic schedule (None: the model's sigmas, i.e. Uniform).
A1111_SAMPLER_DEFAULT_SCHEDULE = {label: options.get("scheduler") for label, (_, options) in A1111_SAMPLERS.items()}


def a1111_sampler_label(name: str):
    """A1111's label of a sampler name as A1111 spells it (a label or an alias: "Euler a",
    "k_euler_a"), else None. Case matters: "Euler" is A1111's, "euler" sdengine's."""
    name = str(name).strip()
    if name in A1111_SAMPLERS:
        return name
    return A1111_SAMPLER_ALIASES.get(name)


def a1111_schedule_label(name: str):
    """A1111's label of a schedule name ("Karras", "karras", "SGMUniform"), else None."""
    name = str(name).strip()
    return A1111_SCHEDULE_ALIASES.get(name)


def split_a1111_label(name: str):
    """(sampler label, schedule label or None) of an A1111 sampler name that may carry a schedule,
    as A1111 before 1.9 wrote them ("DPM++ 2M Karras" -> ("DPM++ 2M", "Karras")); a name that is
    no A1111 sampler comes back whole, with None (sd_samplers.get_sampler_and_scheduler)."""
    name = str(name).strip()
    if a1111_sampler_label(name):
        return a1111_sampler_label(name), None
    for schedule in sorted(A1111_SCHEDULE_ALIASES, key=len, reverse=True):
        if name.endswith(" " + schedule) and a1111_sampler_label(name[: -len(schedule) - 1]):
            return a1111_sampler_label(name[: -len(schedule) - 1]), A1111_SCHEDULE_ALIASES[schedule]
    return name, None


# ---------------------------------------------------------------------------
# The C API's enums (csrc/include/sdengine.h: sde_sampler, sde_schedule), written from these by
# csrc/tools/gen_sampler_names.py: every sampler of both vocabularies (NAMES' and A1111's) and
# every schedule (under A1111's rules "default" is its Automatic and "ddim_uniform" its DDIM),
# in the order of their enum values. Append only: a value's number is part of the C ABI.
# ---------------------------------------------------------------------------

C_SAMPLERS = ("euler", "euler_a", "ddim", "dpmpp_2m", "pndm", "lms", "heun", "dpm_2", "dpm_2_a", "dpmpp_2m_sde",
              "dpmpp_sde", "dpmpp_3m_sde", "unipc", "lcm", "ddpm", "dpmpp_2m_sde_heun", "dpmpp_2s_a", "dpm_fast",
              "dpm_adaptive", "restart", "ddim_cfgpp")
C_SCHEDULES = ("default", "normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "uniform",
               "polyexponential", "kl_optimal", "align_your_steps", "beta")
# A1111's schedule names that the C enum spells otherwise
C_A1111_SCHEDULE_NAMES = {"automatic": "default", "ddim": "ddim_uniform"}
if set(C_SAMPLERS) != set(SAMPLERS) | {name for name, _ in A1111_SAMPLERS.values()} or len(set(C_SAMPLERS)) != len(C_SAMPLERS):
    raise ValueError("names.py: C_SAMPLERS must list every sampler of NAMES and A1111_SAMPLERS once")
if set(C_SCHEDULES) != set(SCHEDULES) | {C_A1111_SCHEDULE_NAMES.get(n, n) for n in A1111_SCHEDULES.values()} or \
        len(set(C_SCHEDULES)) != len(C_SCHEDULES):
    raise ValueError("names.py: C_SCHEDULES must list every schedule of NAMES and A1111_SCHEDULES once")
