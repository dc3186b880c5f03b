"""A fresh clone on whatever pip resolves today: nothing of ours hides an installed package.

Python puts the working directory first on `sys.path` (`python -m`, `python -c`). Run from
the repo root, a top-level folder that is a package shadows any installed distribution of the
same name. That is how transformers 5.25 (which imports PyPI's `kernels`) broke every test
that built a diffusers reference, while our `kernels/` folder had an `__init__.py`. So these
tests run Python from the repo root, in subprocesses, as a user would.

The versions that pip resolved (torch, transformers, diffusers, kernels, ...) are printed at
the start of every pytest run (tests/conftest.py), so that a failing run shows what moved.
"""

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN_PACKAGE = "sdengine"  # our own distribution's import name: the one package the root may hold


def _top_level_folders() -> list[str]:
    """The repo's top-level folders whose names could be imported (hidden ones and build
    outputs are not part of the repo)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0 and tracked.stdout:
        names = {line.split("/", 1)[0] for line in tracked.stdout.splitlines() if "/" in line}
    else:  # not a git checkout (an sdist): what is there
        names = {p.name for p in ROOT.iterdir() if p.is_dir()}
    return sorted(n for n in names if n.isidentifier() and not n.startswith("."))


def _is_our_folder(origin: str, name: str) -> bool:
    """Whether an import of `name` found the repo's own top-level folder (or a module of that
    name at the root), rather than an installed copy (the venv may itself be under the root)."""
    path = Path(origin).resolve()
    return path.is_relative_to(ROOT / name) or path.parent == ROOT


def _run_from_root(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_top_level_folders_are_found():
    folders = _top_level_folders()
    assert {"kernels", "export", "csrc", "sdengine", "tests"} <= set(folders), folders


def test_no_top_level_folder_shadows_an_installed_distribution():
    """For every top-level folder: imported by name from the repo root, it is never our folder
    as a package or module, unless it is sdengine itself. Where a distribution installs that
    name (importlib.metadata.packages_distributions()), the import finds the distribution."""
    folders = _top_level_folders()
    installed = {name: dists for name, dists in metadata.packages_distributions().items()
                 if name != OWN_PACKAGE}
    probe = """
import importlib.util, json, sys
found = {}
for name in sys.argv[1:]:
    spec = importlib.util.find_spec(name)
    found[name] = None if spec is None else {"origin": spec.origin,
                                             "locations": list(spec.submodule_search_locations or [])}
print(json.dumps(found))
"""
    done = subprocess.run([sys.executable, "-c", probe, *folders], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    for name in folders:
        if name == OWN_PACKAGE:
            continue
        spec = found[name]
        folder = ROOT / name
        # A regular package or a module of ours at the root: it would hide any distribution of this name.
        if spec is not None and spec["origin"] is not None:
            assert not _is_our_folder(spec["origin"], name), \
                f"{name!r} imported from the repo root is our {spec['origin']}: it would hide an installed {name!r}"
        assert not (folder / "__init__.py").exists(), f"{folder}/__init__.py makes {name!r} a package at the root"
        if name in installed:
            assert spec is not None and spec["origin"] is not None, \
                f"{name!r} (from {installed[name]}) is not importable from the repo root: {spec}"


def test_installed_kernels_distribution_wins_from_the_repo_root():
    """The case that broke: PyPI's `kernels` (transformers needs it) against our kernels/."""
    try:
        metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        pytest.skip("the PyPI package 'kernels' is not installed (an older transformers)")
    done = _run_from_root("import kernels; print(kernels.__file__)")
    assert done.returncode == 0, done.stderr
    assert not _is_our_folder(done.stdout.strip(), "kernels"), done.stdout


def test_sdengine_kernels_and_export_are_packages_from_anywhere(tmp_path):
    """sdengine.kernels and sdengine.export keep their public faces, run from the repo root or
    from elsewhere, and reach the modules in the top-level folders."""
    code = ("import sdengine.kernels as k, sdengine.export as e, sdengine.kernels.ops, sdengine.export.engine_meta; "
            "print(k.HAS_TRITON in (True, False), callable(k.attention), callable(k.attention_ref), "
            "sdengine.kernels.ops.__file__, sdengine.export.engine_meta.__file__)")
    for cwd in (ROOT, tmp_path):
        done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        ok_triton, ok_attention, ok_ref, ops_file, meta_file = done.stdout.split()
        assert (ok_triton, ok_attention, ok_ref) == ("True", "True", "True")
        assert Path(ops_file).name == "ops.py" and Path(ops_file).parent.name == "kernels"
        assert Path(meta_file).name == "engine_meta.py" and Path(meta_file).parent.name == "export"


def test_transformers_and_diffusers_import_from_the_repo_root():
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    done = _run_from_root("import transformers, diffusers; from transformers import CLIPTextModel; print('ok')",
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_bench_from_the_repo_root_measures_both_backends(tmp_path):
    """`sdengine bench --arch tiny --backends eager,diffusers --steps 1`, run from the repo root:
    both backends' rows are in the record (the workers once inherited the repo root's
    shadowing and both were recorded as skipped)."""
    pytest.importorskip("diffusers")
    script = Path(sys.executable).with_name("sdengine")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sdengine.cli"]
    record_path = tmp_path / "record.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run([*command, "bench", "--arch", "tiny", "--backends", "eager,diffusers", "--steps", "1",
                           "--repeats", "2", "--warmup", "1", "--e2e-repeats", "1", "--e2e-warmup", "0",
                           "--no-progress", "--json", str(record_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(record_path.read_text())
    assert set(record["backends"]) == {"eager", "diffusers"}
    assert all(b["exit"] == 0 for b in record["backends"].values()), record["backends"]
    measured = {(r["backend"], r["component"]) for r in record["results"] if "skipped" not in r}
    assert {b for b, _ in measured} == {"eager", "diffusers"}, record["results"]
    assert ("diffusers", "end_to_end") in measured and ("eager", "end_to_end") in measured


def test_bench_workers_do_not_import_from_the_callers_directory(tmp_path):
    """The worker's command keeps the caller's working directory off its sys.path (-P), and
    its environment puts this sdengine's own folder first: a package in the caller's
    directory named like an installed one cannot hide it."""
    from sdengine.bench.harness import worker_command, worker_env

    (tmp_path / "json").mkdir()  # a package that would hide the standard library's json
    (tmp_path / "json" / "__init__.py").write_text("raise ImportError('the caller directory shadowed json')\n")
    if sys.version_info < (3, 11):
        pytest.skip("Python 3.10 has no -P")
    command = worker_command(tmp_path / "spec.json")
    assert command[-3:] == ["-m", "sdengine.bench.worker", str(tmp_path / "spec.json")]
    # the worker's interpreter and flags, running a probe instead of the worker module
    probe = [*command[:-3], "-c", "import json, sdengine; print(sdengine.__file__)"]
    done = subprocess.run(probe, cwd=tmp_path, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    import sdengine

    assert Path(done.stdout.strip()).resolve() == Path(sdengine.__file__).resolve()


def test_bench_outputs_without_matplotlib(tmp_path, monkeypatch, capsys):
    """Without the `bench` extra's matplotlib, the record's JSON and markdown are still
    written; only the chart is skipped, with one line naming the install command."""
    from sdengine.bench import output

    record = json.loads(next((ROOT / "benchmarks" / "results").glob("*.json")).read_text())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    paths = output.write_outputs(record, tmp_path / "r.json")
    assert set(paths) == {"json", "md"} and paths["json"].exists() and paths["md"].exists()
    assert not (tmp_path / "r.png").exists()
    err = capsys.readouterr().err
    assert "chart skipped" in err and "pip install" in err and "matplotlib" in err
