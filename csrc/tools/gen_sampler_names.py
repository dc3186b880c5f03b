"""Generate the C++ sampler / schedule name table from sdengine/samplers/names.py.

    python csrc/tools/gen_sampler_names.py sdengine/samplers/names.py OUT.inc

names.py is plain data (`NAMES`); it is executed on its own, so the build needs neither
torch nor the sdengine package importable. CMake runs this at build time, so the C API
(sde_sampler_from_str) and Python (sdengine.samplers.resolve) read one table.
"""

import json
import sys
from pathlib import Path


def c_string(s: str) -> str:
    return json.dumps(s)  # a valid C string literal for ASCII names


def main(src: str, out: str) -> None:
    namespace: dict = {}
    exec(compile(Path(src).read_text(encoding="utf-8"), src, "exec"), namespace)
    names = namespace["NAMES"]
    lines = [f"// Generated from {Path(src).name} by csrc/tools/gen_sampler_names.py. Do not edit.", ""]
    for table in ("samplers", "schedules"):
        lines.append(f"static const char *const kNames_{table}[][2] = {{")
        for key, value in names[table].items():
            lines.append(f"    {{{c_string(key)}, {c_string(value)}}},")
        lines.append("};")
    text = "\n".join(lines) + "\n"
    out_path = Path(out)
    if not out_path.exists() or out_path.read_text() != text:  # keep the timestamp when unchanged
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(text)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
