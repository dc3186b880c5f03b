"""The runtime's file readers against their references, on mutated files (tests/support/fuzz_files.py).

- safetensors: the C++ reader (csrc/src/safetensors.cpp, through sdengine._C) accepts exactly
  the mutants that the safetensors library accepts, and returns byte-equal tensors and the
  same metadata. 2,000 mutants of the tiny models' files.
- single files: the C++ single-file key map (csrc/src/single_file.cpp) of mutants of the tiny
  SD1 model's A1111 file accepts exactly what the safetensors library plus sdengine.ldm_layout's
  transforms and shape rules accept, with byte-equal weights. 1,000 mutants.
- engine.json: the C++ rules (csrc/src/engine_meta.cpp) and the Python ones
  (export/engine_meta.py, over Python's json module) accept exactly the same mutants and
  read the same values. 1,000 mutants.
Every draw is seeded (SDE_FUZZ_SEED changes it); 0 disagreements, no read over 1 s, and no
crash (the run would not finish). tests/c/run_asan.sh runs 300 more of each through the same
readers under AddressSanitizer.
"""

from __future__ import annotations

import faulthandler
import os
import random
import struct

import pytest

import json

from support.fuzz_files import (EngineMutator, Mutator, assemble, cpp_engine, cpp_read, cpp_single_file, engine_meta_for,
                        ldm_seed, reference_engine, reference_read, reference_single_file, run_differential,
                        same_engine, seed_files, split)

_C = pytest.importorskip("sdengine._C")
SEED = int(os.environ.get("SDE_FUZZ_SEED", "19"))
MUTANTS = 2000
SINGLE_FILE_MUTANTS = 1000
ENGINE_MUTANTS = 1000


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return seed_files(tmp_path_factory.mktemp("fuzz-seeds"))


@pytest.fixture(autouse=True)
def watchdog():
    """A reader that hangs fails the run with every thread's stack instead of stalling CI."""
    faulthandler.dump_traceback_later(600, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def test_safetensors_reader_accepts_exactly_what_the_reference_accepts(seeds, tmp_path):
    report = run_differential(Mutator(seeds, random.Random(SEED)), MUTANTS, cpp_read, tmp_path,
                              keep_disagreements=tmp_path)
    print(f"safetensors (seed {SEED}): {report.line()}")
    assert not report.disagreements, f"{len(report.disagreements)} disagreements, first ones: " \
                                     f"{report.disagreements[:5]} (files kept in {tmp_path})"
    assert report.slowest_s < 1.0, f"a read took {report.slowest_s:.2f} s"
    # The draw must exercise both sides: accepted mutants (byte-equality) and refused ones.
    assert report.accepted >= MUTANTS // 10 and report.rejected >= MUTANTS // 2, report.line()


def _file(tmp_path, header: bytes, data: bytes, pad=True, name="f.safetensors"):
    path = tmp_path / name
    path.write_bytes(assemble(header, data, pad=pad))
    return path


F32x2 = b'"dtype":"F32","shape":[2],"data_offsets":'
CASES = {
    # The three kinds the old reader accepted (issue 19): a duplicated entry (overlapping
    # ranges), a metadata value that is not a string, and the header length shortened into
    # the header's space padding, which read every tensor one byte early.
    "overlapping ranges": (b'{"a":{' + F32x2 + b'[0,8]},"b":{' + F32x2 + b'[0,8]}}', bytes(8), "contiguous"),
    "metadata value not a string": (b'{"__metadata__":{"step":1},"a":{' + F32x2 + b'[0,8]}}', bytes(8),
                                    "not a string"),
    "gap between ranges": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', bytes(8), "contiguous"),
    "data left over": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(8), "data bytes"),
    "shape x dtype overflows": (b'{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}}', b"",
                                "overflows"),
    "size does not match": (b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', bytes(8), "need 12 bytes"),
    "negative dimension": (b'{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', bytes(8), "non-negative"),
    "float offset": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}', bytes(8), "non-negative"),
    "NaN in the header": (b'{"__metadata__":{"x":NaN},"a":{' + F32x2 + b'[0,8]}}', bytes(8), "invalid JSON"),
    "invalid UTF-8": (b'{"\xff":{' + F32x2 + b'[0,8]}}', bytes(8), "UTF-8"),
    "metadata twice": (b'{"__metadata__":{},"__metadata__":{},"a":{' + F32x2 + b'[0,8]}}', bytes(8), "twice"),
    "nesting past 127": (b'{"a":{"x":' + b"[" * 126 + b"]" * 126 + b"," + F32x2 + b'[0,8]}}', bytes(8), "nesting"),
    "6-bit dtype": (b'{"a":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]}}', bytes(3), "no torch"),
}


@pytest.mark.parametrize("case", CASES)
def test_safetensors_reader_refuses_with_the_rule(tmp_path, case):
    header, data, words = CASES[case]
    path = _file(tmp_path, header, data)
    assert not reference_read(path).ok, "the reference accepts this case: it is not a corrupt file"
    with pytest.raises(ValueError, match=words):
        _C.read_safetensors(str(path))


def test_header_length_into_padding_is_refused(seeds, tmp_path):
    """The file the old reader loaded with every tensor one byte early."""
    n, header, data = split(seeds[0].read_bytes())
    padding = len(header) - len(header.rstrip(b" "))
    header = header if padding else header + b" "
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) - 1) + header + data)
    assert not reference_read(path).ok
    with pytest.raises(ValueError, match="data ranges end at byte"):
        _C.read_safetensors(str(path))


def test_safetensors_reader_accepts_what_the_format_allows(tmp_path):
    """Accepted by the reference, so accepted here with the same tensors: whitespace padding,
    the array form of a tensor, a dtype as {"NAME": null}, ignored fields, a name given twice
    (the last counts), null metadata, empty and scalar tensors, F4 pairs."""
    cases = [
        (b'{"a":{' + F32x2 + b'[0,8]}}\n\t ', bytes(range(8))),
        (b'{"a":["F32",[2],[0,8]]}', bytes(range(8))),
        (b'{"a":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8],"extra":[[{"x":1e-400}]]}}', bytes(range(8))),
        (b'{"a":{"dtype":"F64","shape":[],"data_offsets":[0,8]},"a":{' + F32x2 + b'[0,8]}}', bytes(range(8))),
        (b'{"__metadata__":null,"e":{"dtype":"F16","shape":[0,3],"data_offsets":[0,0]}}', b""),
        (b'{"f4":{"dtype":"F4","shape":[3,2],"data_offsets":[0,3]},"s":{"dtype":"U8","shape":[],'
         b'"data_offsets":[3,4]}}', bytes(range(4))),
    ]
    for i, (header, data) in enumerate(cases):
        path = _file(tmp_path, header, data, name=f"ok-{i}.safetensors")
        expected, got = reference_read(path), cpp_read(path)
        assert expected.ok and got.ok, (i, expected.error, got.error)
        assert got.tensors == expected.tensors and got.metadata == expected.metadata, i


# ---------------------------------------------------------------------------
# Single files and engine.json
# ---------------------------------------------------------------------------

def test_single_file_map_accepts_exactly_what_the_reference_accepts(tmp_path):
    ldm, engine = ldm_seed(tmp_path / "seed")
    meta = json.loads(engine.read_text())
    report = run_differential(Mutator([ldm], random.Random(SEED)), SINGLE_FILE_MUTANTS, cpp_single_file(engine),
                              tmp_path, reference=lambda path: reference_single_file(path, meta),
                              keep_disagreements=tmp_path)
    print(f"single-file (seed {SEED}): {report.line()}")
    assert not report.disagreements, f"{len(report.disagreements)} disagreements, first ones: " \
                                     f"{report.disagreements[:5]} (files kept in {tmp_path})"
    assert report.slowest_s < 1.0, f"a read took {report.slowest_s:.2f} s"
    assert report.accepted >= SINGLE_FILE_MUTANTS // 10 and report.rejected >= SINGLE_FILE_MUTANTS // 2, report.line()


@pytest.fixture(scope="module")
def engine_json(tmp_path_factory):
    from sdengine.config import tiny_config

    folder = tmp_path_factory.mktemp("engine-seed")
    path = folder / "engine.json"
    path.write_text(json.dumps(engine_meta_for(tiny_config("sd15"), folder), indent=1))
    return path


def test_engine_json_rules_agree_between_cpp_and_python(engine_json, tmp_path):
    report = run_differential(EngineMutator([engine_json], random.Random(SEED)), ENGINE_MUTANTS, cpp_engine, tmp_path,
                              compare=same_engine, reference=reference_engine, suffix=".json",
                              keep_disagreements=tmp_path)
    print(f"engine.json (seed {SEED}): {report.line()}")
    assert not report.disagreements, f"{len(report.disagreements)} disagreements, first ones: " \
                                     f"{report.disagreements[:5]} (files kept in {tmp_path})"
    assert report.slowest_s < 1.0, f"a read took {report.slowest_s:.2f} s"
    assert report.accepted >= ENGINE_MUTANTS // 10 and report.rejected >= ENGINE_MUTANTS // 2, report.line()


@pytest.mark.parametrize("change, words", [
    (lambda m: m["networks"]["unet"].update(package="../../elsewhere/unet.pt2"), "networks.unet.package must name"),
    (lambda m: m.update(format=2), "format is 2"),
    (lambda m: m["config"]["vae"].update(scaling_factor=float("nan")), "config.vae.scaling_factor must be a finite"),
    (lambda m: m["networks"]["unet"]["constants"].update({"m.conv_in.weight": [32, -1, 3, 3]}),
     "networks.unet.constants.m.conv_in.weight must be an integer"),
    (lambda m: m["networks"].pop("vae_decoder"), "networks.vae_decoder is missing"),
    (lambda m: m["single_file"].update(tokenizer="/etc"), "single_file.tokenizer must name"),
    (lambda m: m["config"]["scheduler"].update(num_train_timesteps=1e9), "num_train_timesteps must be an integer"),
])
def test_engine_json_refused_with_the_key(engine_json, tmp_path, change, words):
    meta = json.loads(engine_json.read_text())
    change(meta)
    path = tmp_path / "engine.json"
    path.write_text(json.dumps(meta))
    assert not reference_engine(path).ok
    with pytest.raises(ValueError, match=words):
        _C.read_engine_json(str(path))
