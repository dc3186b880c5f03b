"""Building the AOTInductor engine: each network compiled in a child process, crashes named, retried
with safer settings, nothing half-built left behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import sdengine
from sdengine.config import tiny_config
from support.native import PROMPT, SIZE, cache_dir, eager, eager_uint8, engine_dir, model_dir, native, one_thread

_C = pytest.importorskip("sdengine._C")


class _AbortsWhenUnpickled:
    """A stand-in model config whose unpickling in the compiler's child process aborts it."""

    name = "crashy"

    def __reduce__(self):
        return os.abort, ()


def test_compiler_crash_is_an_error_naming_the_network(tmp_path):
    """Each network compiles in a child process: a crash there (torch 2.11 segfaulted compiling
    a CUDA engine) is a RuntimeError naming the network and the signal, with the child's output."""
    from sdengine.export import aoti

    with pytest.raises(RuntimeError, match="crashy: compiling the unet network for cpu fp32 was killed by SIGABRT"):
        aoti.compile_in_child(_AbortsWhenUnpickled(), "unet", torch.float32, torch.device("cpu"), tmp_path)
    with pytest.raises(RuntimeError, match="(?s)failed \\(exit status 1\\).*unknown network 'nonesuch'"):
        aoti.compile_in_child(tiny_config("sd15"), "nonesuch", torch.float32, torch.device("cpu"), tmp_path)
    assert not list(tmp_path.iterdir()), "the spec files are removed"


def test_failed_engine_build_leaves_nothing_behind(tmp_path, monkeypatch):
    from sdengine.export import aoti

    def fail(config, name, dtype, device, folder, settings=None, timeout=None):
        (folder / f"{name}.pt2").write_bytes(b"half")
        raise RuntimeError(f"compiling the {name} network was killed by SIGSEGV")

    monkeypatch.setattr(aoti, "compile_in_child", fail)
    with pytest.raises(RuntimeError, match="SIGSEGV"):
        aoti.build_engine(tiny_config("sd15"), tmp_path / "engine", dtype=torch.float32, device="cpu",
                          progress=False)
    assert not list(tmp_path.iterdir()), "no engine and no temporary folder is left"


def _reuse_cached(engine_dir, names, real, static_shapes=None):
    """A compile_in_child that copies the networks `names` from the cached engine instead of
    compiling them (the retry tests compile only the networks they crash)."""
    meta = json.loads((Path(engine_dir) / "engine.json").read_text())
    from safetensors.torch import load_file

    buffers = load_file(str(Path(engine_dir) / "buffers.safetensors")) \
        if (Path(engine_dir) / "buffers.safetensors").is_file() else {}

    def compile_or_reuse(config, name, dtype, device, folder, *args, **kwargs):
        if name not in names:
            return real(config, name, dtype, device, folder, *args, **kwargs)
        shutil.copy(Path(engine_dir) / f"{name}.pt2", folder / f"{name}.pt2")
        return {"constants": meta["networks"][name]["constants"], "compile_s": 0.0,
                "static_shape": (static_shapes or {}).get(name),
                "buffers": {k.split("/", 1)[1]: v for k, v in buffers.items() if k.startswith(f"{name}/")}}
    return compile_or_reuse


def test_engine_builds_through_retries_when_compiles_crash(native, eager, model_dir, engine_dir, tmp_path,
                                                           monkeypatch):
    """A network whose compile child dies (an injected os.abort, as torch 2.11's segfault) is
    compiled again with safer settings: the text encoder twice (weights in the package, then
    static shapes: batch 1, run row by row), the VAE decoder once (weights in the package).
    engine.json records every attempt, and the engine gives the eager pipeline's images from
    C++ and from the Python loop."""
    from sdengine.backends.aoti import AOTIBackend
    from sdengine.export import aoti as export

    monkeypatch.setattr(export, "compile_in_child", _reuse_cached(engine_dir, ("unet", "vae_encoder"),
                                                                  export.compile_in_child))
    monkeypatch.setenv(export.INJECT_CRASH_ENV,
                       "text_encoder:dynamic,text_encoder:constants-in-so,vae_decoder:dynamic")
    built = export.build_engine(native.config, tmp_path / "engine", dtype=torch.float32, device="cpu",
                                progress=False)
    meta = json.loads((built / "engine.json").read_text())
    text, decoder = meta["networks"]["text_encoder"], meta["networks"]["vae_decoder"]
    assert [(a["settings"], a["outcome"]) for a in text["attempts"]] == [
        ("dynamic", "was killed by SIGABRT"), ("constants-in-so", "was killed by SIGABRT"), ("static", "ok")]
    assert text["settings"]["static"] and text["static_shape"] == [1, 77]
    assert [(a["settings"], a["outcome"]) for a in decoder["attempts"]] == [
        ("dynamic", "was killed by SIGABRT"), ("constants-in-so", "ok")]
    assert decoder["settings"]["constants_in_so"] and decoder["static_shape"] is None
    assert meta["build_s"] > 0
    # The C++ loop: the text encoder at batch 2 (prompt and negative of two images) row by row.
    ours = _C.Model(str(model_dir), str(built)).generate(PROMPT, "blurry", SIZE, SIZE, 3, 7.5, 7, 2, "euler_a",
                                                          None, 0.0, None)
    ref = eager_uint8(eager, "euler_a", None, seed=7, negative="blurry", batch_size=2)
    for (data, w, h, _), expected in zip(ours, ref):
        image = np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3)
        assert np.abs(image.astype(int) - expected.astype(int)).max() <= 2
    # The Python loop on the same engine (aoti): the static text encoder row by row there too,
    # its clip_skip input (B,) with it.
    loaded = sdengine.load(model_dir, backend="eager")
    backend = AOTIBackend(loaded.config, loaded.backend.text_encoder, loaded.backend.unet, loaded.backend.vae,
                          engine_dir=built)
    ids = loaded.tokenizer([PROMPT, "blurry", ""])
    for clip_skip in (None, 1):
        context, _ = backend.encode_text(ids, clip_skip=clip_skip)
        with torch.inference_mode():
            expected, _ = loaded.backend.text_encoder(ids, clip_skip=clip_skip)
        torch.testing.assert_close(context, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="the text_encoder network of this engine runs inputs of shape"):
        backend.encode_text(torch.zeros(1, 70, dtype=torch.long))


def test_static_unet_takes_one_prompt_window(native, model_dir, engine_dir, tmp_path, monkeypatch):  # noqa: F811
    """A UNet built with static shapes (the last retry) takes 77-token contexts only: engine.json
    says max_prompt_windows 1, the C++ loop refuses a prompt of two windows with the reason, and
    the aoti backend takes one window (the pipeline cuts a longer prompt with a warning, as for onnx)."""
    from sdengine.backends.aoti import AOTIBackend
    from sdengine.export import aoti as export

    unet_shape = [2, native.config.unet.in_channels, native.config.unet.sample_size, native.config.unet.sample_size]
    monkeypatch.setattr(export, "compile_in_child", _reuse_cached(engine_dir, export.NETWORKS, export.compile_in_child,
                                                                  {"unet": unet_shape}))
    built = export.build_engine(native.config, tmp_path / "engine", dtype=torch.float32, device="cpu", progress=False)
    assert json.loads((built / "engine.json").read_text())["max_prompt_windows"] == 1
    model = _C.Model(str(model_dir), str(built))
    with pytest.raises(ValueError, match=r"needs 2 windows of 75 tokens \(a longer prompt, or BREAK\) but this "
                                         r"engine's UNet takes at most 1 \(it was compiled with static shapes\)"):
        model.generate("a BREAK b", None, SIZE, SIZE, 2, prompt_syntax="a1111")
    loaded = sdengine.load(model_dir, backend="eager")
    backend = AOTIBackend(loaded.config, loaded.backend.text_encoder, loaded.backend.unet, loaded.backend.vae,
                          engine_dir=built)
    assert backend.max_prompt_windows == 1


def test_engine_build_that_cannot_succeed_names_network_and_attempts(native, tmp_path, monkeypatch):
    from sdengine.export import aoti as export

    monkeypatch.setenv(export.INJECT_CRASH_ENV,
                       "text_encoder:dynamic,text_encoder:constants-in-so,text_encoder:static")
    with pytest.raises(RuntimeError, match="the text_encoder network did not compile for cpu fp32 with any settings "
                                           r"\(dynamic: was killed by SIGABRT; constants-in-so: was killed by "
                                           r"SIGABRT; static: was killed by SIGABRT\)"):
        export.build_engine(native.config, tmp_path / "engine", dtype=torch.float32, device="cpu", progress=False)
    assert not list(tmp_path.iterdir()), "nothing half-built is left"


def test_export_cli_registers_aoti(tmp_path):
    from sdengine.cli import build_parser, main

    args = build_parser().parse_args(["export", "aoti", str(tmp_path / "missing"), "--out", str(tmp_path / "e")])
    assert args.func.__module__ == "sdengine.export.cli" and args.out == str(tmp_path / "e")
    assert main(["export", "aoti", str(tmp_path / "missing")]) == 2  # a clear error, no traceback
