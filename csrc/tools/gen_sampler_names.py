"""Generate the C++ sampler / schedule tables from sdengine/samplers/names.py and sdengine/config.py.

    python csrc/tools/gen_sampler_names.py sdengine/samplers/names.py OUT.inc [sdengine/config.py]
    python csrc/tools/gen_sampler_names.py sdengine/samplers/names.py --header csrc/include/sdengine.h

names.py is plain data; it is executed on its own, and config.py's scheduler tables are read
with `ast` (literals only), so the build needs neither torch nor the sdengine package
importable. CMake runs the first form at build time, so the C API (sde_sampler_from_str, the
samplers' A1111 options, the scheduler classes' defaults) and Python read one table. The
second form rewrites the enums of the public header (sde_sampler, sde_schedule) between their
markers from names.py's C_SAMPLERS / C_SCHEDULES; the generated .inc holds static_asserts that
fail the build when the header and names.py disagree.
"""

import ast
import json
import sys
from pathlib import Path

BEGIN, END = "/* BEGIN GENERATED ENUMS (csrc/tools/gen_sampler_names.py) */", "/* END GENERATED ENUMS */"
CONFIG_TABLES = ("SCHEDULER_CLASS_DEFAULTS", "SD_PIPELINE_VALUES", "NEUTRAL_SAMPLING_VALUES",
                 "SCHEDULER_CLASS_TO_SAMPLER")


def c_string(s: str) -> str:
    return json.dumps(s)  # a valid C string literal for ASCII names


def names_of(src: str) -> dict:
    namespace: dict = {}
    exec(compile(Path(src).read_text(encoding="utf-8"), src, "exec"), namespace)
    return namespace


def config_tables(path: str) -> dict:
    """The literal tables of config.py (their values as JSON text)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), path)
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in CONFIG_TABLES:
                out[node.targets[0].id] = ast.literal_eval(node.value)
    missing = set(CONFIG_TABLES) - set(out)
    if missing:
        raise SystemExit(f"{path}: no literal {', '.join(sorted(missing))}")
    return out


def enum_block(ns: dict) -> str:
    labels = ns["A1111_LABELS"]["samplers"]
    a1111 = {name: label for label, (name, _) in ns["A1111_SAMPLERS"].items()}
    lines = [BEGIN, "typedef enum sde_sampler {",
             "  SDE_SAMPLER_DEFAULT = -1, /* the model's scheduler_config.json */"]
    for i, name in enumerate(ns["C_SAMPLERS"]):
        label = labels.get(name) or a1111.get(name)
        only = "" if name in ns["SAMPLERS"] else ", A1111's rules only"
        lines.append(f"  SDE_SAMPLER_{name.upper()} = {i}, /* {label}{only} */")
    lines += ["  SDE_SAMPLER_COUNT", "} sde_sampler;", "", "typedef enum sde_schedule {"]
    a1111_schedules = {ns["C_A1111_SCHEDULE_NAMES"].get(n, n): label for label, n in ns["A1111_SCHEDULES"].items()}
    for i, name in enumerate(ns["C_SCHEDULES"]):
        label = a1111_schedules.get(name, "")
        only = "" if name in ns["SCHEDULES"] else ", A1111's rules only"
        what = "what the model's scheduler config says (A1111: the sampler's own)" if name == "default" else label
        lines.append(f"  SDE_SCHEDULE_{name.upper()} = {i}, /* {what}{only} */")
    lines += ["  SDE_SCHEDULE_COUNT", "} sde_schedule;", END]
    return "\n".join(lines)


def write_header(ns: dict, header: str) -> None:
    text = Path(header).read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + enum_block(ns) + text[end:]
    if new != text:
        Path(header).write_text(new, encoding="utf-8")


def rows(name: str, items, width: int) -> list:
    out = [f"static const char *const {name}[][{width}] = {{"]
    out += ["    {" + ", ".join(c_string(str(v)) for v in item) + "}," for item in items]
    return out + ["};"]


def main(src: str, out: str, config: str = None) -> None:
    ns = names_of(src)
    names = ns["NAMES"]
    lines = [f"// Generated from {Path(src).name} (and config.py) by csrc/tools/gen_sampler_names.py. Do not edit.", ""]
    for table in ("samplers", "schedules"):
        lines += rows(f"kNames_{table}", names[table].items(), 2)
    # the C enums: the header must say what names.py says
    lines += [f"static const char *const kCSamplers[] = {{{', '.join(map(c_string, ns['C_SAMPLERS']))}}};",
              f"static const char *const kCSchedules[] = {{{', '.join(map(c_string, ns['C_SCHEDULES']))}}};"]
    lines += [f"static_assert(SDE_SAMPLER_{n.upper()} == {i}, \"sdengine.h: run csrc/tools/gen_sampler_names.py "
              f"--header\");" for i, n in enumerate(ns["C_SAMPLERS"])]
    lines += [f"static_assert(SDE_SCHEDULE_{n.upper()} == {i}, \"sdengine.h: run csrc/tools/gen_sampler_names.py "
              f"--header\");" for i, n in enumerate(ns["C_SCHEDULES"])]
    lines += [f"static_assert(SDE_SAMPLER_COUNT == {len(ns['C_SAMPLERS'])}, \"sdengine.h: regenerate\");",
              f"static_assert(SDE_SCHEDULE_COUNT == {len(ns['C_SCHEDULES'])}, \"sdengine.h: regenerate\");"]
    # A1111's labels and options: label, sdengine name, Automatic schedule ("" = Uniform), discard,
    # brownian, ensd, eta default ("" = none)
    lines += rows("kA1111Samplers", [
        (label, name, opts.get("scheduler") or "", int(bool(opts.get("discard"))), int(bool(opts.get("brownian"))),
         int(bool(opts.get("ensd"))), "" if "eta" not in opts else repr(float(opts["eta"])))
        for label, (name, opts) in ns["A1111_SAMPLERS"].items()], 7)
    lines += rows("kA1111SamplerAliases", ns["A1111_SAMPLER_ALIASES"].items(), 2)
    lines += rows("kA1111Schedules", [(label, ns["C_A1111_SCHEDULE_NAMES"].get(n, n))
                                      for label, n in ns["A1111_SCHEDULES"].items()], 2)
    lines += rows("kA1111ScheduleAliases", ns["A1111_SCHEDULE_ALIASES"].items(), 2)
    if config:
        tables = config_tables(config)
        lines += rows("kSchedulerClassDefaults", [(cls, key, json.dumps(value)) for cls, keys in
                                                  tables["SCHEDULER_CLASS_DEFAULTS"].items()
                                                  for key, value in keys.items()], 3)
        lines += rows("kSchedulerClassToSampler", tables["SCHEDULER_CLASS_TO_SAMPLER"].items(), 2)
        lines += rows("kSdPipelineValues", [(k, json.dumps(v)) for k, v in tables["SD_PIPELINE_VALUES"].items()], 2)
        lines += rows("kNeutralSamplingValues", [(k, json.dumps(v)) for k, v in
                                                 tables["NEUTRAL_SAMPLING_VALUES"].items()], 2)
    text = "\n".join(lines) + "\n"
    out_path = Path(out)
    if not out_path.exists() or out_path.read_text() != text:  # keep the timestamp when unchanged
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[2] == "--header":
        write_header(names_of(sys.argv[1]), sys.argv[3])
    else:
        main(*sys.argv[1:4])
