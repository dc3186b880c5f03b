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
Values are the canonical sdengine names (sdengine.samplers.SAMPLERS / SCHEDULES).
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


# How A1111 writes each canonical name in the PNG `parameters` text ("Sampler: Euler a",
# "Schedule type: Karras"); every label resolves back to its name through NAMES.
A1111_LABELS = {
    "samplers": {
        "ddim": "DDIM", "ddpm": "DDPM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a",
        "heun": "Heun", "dpm_2": "DPM2", "dpm_2_a": "DPM2 a", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
        "dpmpp_sde": "DPM++ SDE", "dpmpp_3m_sde": "DPM++ 3M SDE", "unipc": "UniPC", "lcm": "LCM",
    },
    "schedules": {
        "default": "Automatic", "normal": "Normal", "karras": "Karras", "exponential": "Exponential",
        "sgm_uniform": "SGM Uniform", "simple": "Simple", "ddim_uniform": "Uniform",
    },
}
