"""A benchmark record's three outputs: the JSON record, a markdown table and a PNG chart.

Each file is written to a temporary name beside its destination, then renamed, so that an
interrupted run never leaves half a file.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Optional

from sdengine.bench.schema import COMPONENT_NAMES, validate

DEFAULT_DIR = Path("benchmarks") / "results"
COMPONENT_TITLES = {"text_encoder": "text encoder", "unet_step": "UNet step (CFG)", "vae_decode": "VAE decode",
                    "end_to_end": "end to end"}


def slug(text: str) -> str:
    """A file-name-safe lowercase form: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    text = re.sub(r"^cpu:\s*", "cpu-", text.strip(), flags=re.I)
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"


def default_json_path(record: dict, out_dir: Optional[Path] = None) -> Path:
    """`<out_dir>/<date>_<device>_<arch>.json`; `-2`, `-3`... if that name is taken."""
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_DIR
    date = record["created"][:10]
    device = slug(record["device"]) if record.get("device_type") == "cuda" else "cpu"
    stem = f"{date}_{device}_{slug(record['workload']['arch'])}"
    path, n = out_dir / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = out_dir / f"{stem}-{n}.json"
    return path


def _write_atomic(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(record: dict, json_path: Path) -> Path:
    """Validate the record and write it as JSON alone (atomically: never half a file)."""
    validate(record)
    _write_atomic(Path(json_path), (json.dumps(record, indent=1) + "\n").encode())
    return Path(json_path)


def write_outputs(record: dict, json_path: Path) -> dict[str, Path]:
    """Validate the record, then write it as JSON, plus .md and .png beside it (same stem).
    Without matplotlib (the `bench` extra) the chart alone is skipped, with one line saying so."""
    json_path = write_json(record, json_path)
    paths = {"json": json_path, "md": json_path.with_suffix(".md")}
    _write_atomic(paths["md"], markdown(record).encode())
    try:
        png = chart_png(record)
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":
            raise
        print("chart skipped: matplotlib is not installed (pip install 'sdengine[bench]' or pip install matplotlib)",
              file=sys.stderr)
        return paths
    paths["png"] = json_path.with_suffix(".png")
    _write_atomic(paths["png"], png)
    return paths


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------

def _ms(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if value < 10 else f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def _gib(value) -> str:
    return "–" if value is None else f"{value / 2 ** 30:.2f}"


def measured(record: dict) -> list:
    return [r for r in record["results"] if "skipped" not in r]


def sampler_name(workload: dict) -> str:
    """'euler', 'dpmpp_2m karras'; '' in records older than the sampler field."""
    sampler, schedule = workload.get("sampler") or "", workload.get("schedule") or "default"
    return sampler if schedule == "default" else f"{sampler} {schedule}"


def title(record: dict) -> str:
    w = record["workload"]
    sampler = sampler_name(w)
    count = w.get("controlnets") or 0
    controlnets = f", {count} ControlNet{'s' if count > 1 else ''}" if count else ""
    hires = f", hires fix ×{w['hires_scale']:g}" if w.get("hires_scale") else ""
    adapters = w.get("ip_adapters") or 0
    ip = f", {adapters} IP-Adapter{'s' if adapters > 1 else ''}" if adapters else ""
    return (f"{w['arch']} {w['width']}×{w['height']}, {w['steps']} steps{' of ' + sampler if sampler else ''}, "
            f"batch {w['batch']}{controlnets}{hires}{ip}, {w['dtype']} on {record['device']}")


def markdown(record: dict, heading_level: int = 2) -> str:
    """The record as markdown: a header, one row per backend, then the details and skips."""
    lines = [f"{'#' * heading_level} {title(record)}", ""]
    versions = record.get("versions", {})
    facts = [f"commit `{record['commit'][:10]}`" + (" (dirty)" if record.get("dirty") else ""),
             record["created"][:16].replace("T", " ") + " UTC", f"torch {versions.get('torch')}"]
    if versions.get("cuda"):
        facts.append(f"CUDA {versions['cuda']}")
    if record.get("driver"):
        facts.append(f"driver {record['driver']}")
    if record.get("threads"):
        facts.append(f"{record['threads']} CPU thread{'s' if record['threads'] > 1 else ''} per backend")
    peaks = record.get("peak_tflops_by_dtype") or {}
    if len(peaks) > 1:
        facts.append("peak " + ", ".join(f"{name} {p['tflops']:.4g} TFLOP/s" for name, p in peaks.items())
                     + f" ({next(iter(peaks.values()))['source'].split(' in ')[0]})")
    elif record.get("peak_tflops"):
        facts.append(f"peak {record['peak_tflops']:.4g} TFLOP/s ({record.get('peak_tflops_source', '')})")
    lines += ["; ".join(facts) + ".", ""]
    if not record.get("complete", True):
        lines += [f"**Incomplete run** (interrupted: {record.get('interrupted')}).", ""]
    lines += [f"Command: `{record['command']}`", ""]
    lines += summary_table(record)
    lines += comparison_lines(record)

    rows = measured(record)
    if rows:
        lines += ["", "| backend | component | p50 ms | p90 ms | min ms | n | warm-up ms | denoising loop p50 ms "
                      "| it/s | TFLOP/s | % peak | peak mem GiB | vs diffusers |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            warmup = _ms(r["warmup_ms"][0]) if r.get("warmup_ms") else "–"
            lines.append(
                f"| {r['backend']} | {r['component']} | {_ms(r['p50_ms'])} | {_ms(r['p90_ms'])} | {_ms(r['min_ms'])} "
                f"| {len(r['samples_ms'])} | {warmup} | {_ms(r.get('loop_p50_ms'))} | {r.get('it_per_s', 0):.3g} "
                f"| {_num(r.get('tflops'))} | {_num(r.get('pct_of_peak'))} | {_gib(r['peak_mem_bytes'])} "
                f"| {_ratio(r.get('speedup_vs_diffusers'))} |")
    host = record.get("host_overhead") or {}
    if "eager" in host and "diffusers" in host:
        lines += ["", f"Host work per UNet forward ({host.get('method', 'meta device')}): eager "
                      f"{host['eager']['aten_ops']} ops, {host['eager']['python_ms']:.1f} ms; diffusers "
                      f"{host['diffusers']['aten_ops']} ops, {host['diffusers']['python_ms']:.1f} ms."]
    phased = [r for r in rows if r["component"] == "end_to_end" and r.get("phases_ms")]
    if phased:
        lines += ["", "End to end, where the last run's time went (network calls; the rest is the sampler, the "
                      "pipeline and the conversion to images):", ""]
        for r in phased:
            p = r["phases_ms"]
            total = r["samples_ms"][-1]
            rest = total - sum(p.values())
            lines.append(f"- {r['backend']}: text {_ms(p.get('encode_text'))} ms, UNet "
                         f"{_ms(p.get('denoise'))} ms ({r.get('unet_calls')} calls), decode {_ms(p.get('decode'))} ms, "
                         f"rest {_ms(max(rest, 0.0))} ms of {_ms(total)} ms")
    skipped = [r for r in record["results"] if "skipped" in r]
    if skipped:
        lines += ["", "Skipped:", ""]
        lines += [f"- {r['backend']}" + (f" {r['component']}" if r.get("component") else "") + f": {r['skipped']}"
                  for r in skipped]
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def _yes_no(value) -> str:
    return "–" if value is None else "yes" if value else "no"


def _mae(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def _ratio(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def comparison_lines(record: dict) -> list:
    """End to end, the fastest sdengine row against each diffusers row and peer, as one sentence."""
    c = record.get("comparison")
    if not c or not c.get("speedup_vs"):
        return []
    versus = ", ".join(f"{ratio:.2f}× {name}" for name, ratio in c["speedup_vs"].items())
    text = f"End to end, the fastest sdengine row, **{c['best']}** ({_ms(c['best_ms'])} ms), runs at {versus}"
    if c.get("fastest_peer"):
        text += f"; against the fastest peer ({c['fastest_peer']}): **{c['speedup_vs_fastest_peer']:.2f}×**"
    return ["", text + " (p50 over p50, in this run)."]


def summary_table(record: dict) -> list:
    """One row per measured backend: its prepare time, p50 of each component, the UNet step's host
    time, UNet it/s, peak memory, speedup, whether the end-to-end run took the backend's fused
    denoising step, and its image's mean absolute error to eager sdengine in fp32."""
    rows = measured(record)
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    if not backends:
        return ["No backend was measured."]
    by_key = {(r["backend"], r["component"]): r for r in rows}
    lines = ["| backend | prepare s | text encoder ms | UNet step ms | UNet host ms | UNet it/s | VAE decode ms "
             f"| end to end ms | UNet % of peak | peak mem GiB | end to end vs {record.get('baseline') or 'diffusers'} "
             "| fused step | MAE vs fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    processes = record.get("backends") or {}
    mae = (record.get("fidelity") or {}).get("mae") or {}
    for backend in backends:
        def p50(component):
            return _ms(by_key[(backend, component)]["p50_ms"]) if (backend, component) in by_key else "–"

        unet = by_key.get((backend, "unet_step"), {})
        e2e = by_key.get((backend, "end_to_end"), {})
        it_per_s = f"{unet['it_per_s']:.1f}" if unet else "–"
        peak_mem = max((r["peak_mem_bytes"] for r in rows if r["backend"] == backend and r["peak_mem_bytes"]),
                       default=None)
        prepare = processes.get(backend, {}).get("prepare_s")
        lines.append(f"| {backend} | {_num(prepare)} | {p50('text_encoder')} | {p50('unet_step')} "
                     f"| {_ms(unet.get('host_p50_ms'))} | {it_per_s} | {p50('vae_decode')} "
                     f"| {p50('end_to_end')} | {_num(unet.get('pct_of_peak'))} | {_gib(peak_mem)} "
                     f"| {_ratio(e2e.get('speedup_vs_diffusers'))} | {_yes_no(e2e.get('fused_step'))} "
                     f"| {_mae(mae.get(backend))} |")
    floor = record.get("floor_ms") or {}
    if floor.get("unet_step"):
        lines.append(f"| *physical floor* | | {_ms(floor.get('text_encoder'))} | {_ms(floor['unet_step'])} | "
                     f"| {1e3 / floor['unet_step']:.1f} | {_ms(floor.get('vae_decode'))} "
                     f"| {_ms(floor.get('end_to_end'))} | 100 | | | | |")
    return lines


# ---------------------------------------------------------------------------
# Chart
# ---------------------------------------------------------------------------

def chart_png(record: dict) -> bytes:
    """Bar chart of the p50 latency per backend, one panel per component; whiskers from the
    minimum to p90; the physical floor (FLOP / peak rate) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = measured(record)
    components = [c for c in COMPONENT_NAMES if any(r["component"] == c for r in rows)] or COMPONENT_NAMES
    fig, axes = plt.subplots(1, len(components), figsize=(3.6 * len(components), 3.8), squeeze=False)
    floor = record.get("floor_ms") or {}
    for ax, component in zip(axes[0], components):
        data = [r for r in rows if r["component"] == component]
        names = [r["backend"] for r in data]
        p50 = [r["p50_ms"] for r in data]
        low = [r["p50_ms"] - r["min_ms"] for r in data]
        high = [r["p90_ms"] - r["p50_ms"] for r in data]
        ax.bar(range(len(data)), p50, yerr=[low, high], capsize=3, color="#4878a8")
        for i, value in enumerate(p50):  # the value inside the bar, clear of the whiskers
            ax.annotate(_ms(value), (i, 0), ha="center", va="bottom", fontsize=7, color="white",
                        xytext=(0, 3), textcoords="offset points")
        if floor.get(component):
            ax.axhline(floor[component], color="#c03030", linestyle="--", linewidth=1.2,
                       label=f"floor {_ms(floor[component])} ms")
            ax.legend(fontsize=7, loc="upper right")
        ax.set_xticks(range(len(data)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(COMPONENT_TITLES[component], fontsize=10)
        ax.set_ylabel("ms (p50; whiskers min–p90)", fontsize=8)
        ax.set_ylim(bottom=0)
        if not data:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title(record), fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
