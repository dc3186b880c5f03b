"""Mutated checkpoint files, and the reference readers to judge the runtime's readers by.

Mutants start from real files (the tiny models' safetensors, written by the safetensors
library) and change them the ways corrupt or hostile files differ: byte flips, truncation,
the header length (into the header's space padding, the case that once made the C++
reader load every tensor one byte early), dtype, shape, data offsets, duplicated and
renamed entries, deep nesting, invalid UTF-8, metadata, int64 overflow, JSON syntax.
Everything is drawn from a seeded random.Random: a run is reproducible from its seed.

The reference for a safetensors file is the `safetensors` library itself:
safe_open(path, framework="pt") and get_tensor for every name. The runtime's reader must
accept exactly the files it accepts and return byte-equal tensors (same names, dtypes,
shapes, bytes, metadata).

The single-file key map's reference is the safetensors library plus sdengine.ldm_layout's
transforms and shape rules; engine.json's is Python's json module plus export/engine_meta.py.

    PYTHONPATH=tests python -m support.fuzz_files all --driver build/asan/sde_fuzz_reader --count 300

runs `count` mutants of each kind (safetensors, engine, single-file) through the compiled
driver (tests/c/fuzz_reader.cpp, one process, e.g. under AddressSanitizer) and compares
every answer with the reference; the exit status is the number of disagreements
(tests/c/run_asan.sh runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The reference's dtype names (safetensors Dtype) and the torch dtypes it returns.
TORCH_DTYPES = {
    "BOOL": torch.bool, "F4": torch.float4_e2m1fn_x2, "U8": torch.uint8, "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "I16": torch.int16,
    "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
    "F32": torch.float32, "C64": torch.complex64, "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}


# ---------------------------------------------------------------------------
# What a reader returns, and its digest (the same as tests/c/fuzz_reader.cpp's)
# ---------------------------------------------------------------------------

@dataclass
class Read:
    """A reader's answer: ok with tensors {name: (dtype, shape, bytes)} and metadata, or an error."""

    ok: bool
    tensors: dict = field(default_factory=dict)
    metadata: dict | None = None
    error: str = ""

    def digest(self) -> str:
        """FNV-1a 64 of every tensor by name (name, dtype, "d0,d1,", bytes; strings with a NUL),
        then "__metadata__" and each key and value when there is metadata."""
        h = 14695981039346656037
        mask = (1 << 64) - 1

        def add(data: bytes):
            nonlocal h
            for b in data:
                h = ((h ^ b) * 1099511628211) & mask

        for name in sorted(self.tensors, key=lambda s: s.encode()):
            dtype, shape, data = self.tensors[name]
            add(name.encode() + b"\0")
            add(dtype.encode() + b"\0")
            add("".join(f"{d}," for d in shape).encode() + b"\0")
            add(data)
        if self.metadata is not None:
            add(b"__metadata__\0")
            for key in sorted(self.metadata, key=lambda s: s.encode()):
                add(key.encode() + b"\0")
                add(self.metadata[key].encode() + b"\0")
        return f"{h:016x}"


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def reference_read(path) -> Read:
    """The safetensors library: safe_open(framework="pt"), then get_tensor for every name."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {}
            for name in f.keys():
                t = f.get_tensor(name)
                tensors[name] = (DTYPE_NAMES[t.dtype], tuple(t.shape), tensor_bytes(t))
            metadata = f.metadata()
        return Read(True, tensors, metadata)
    except BaseException as e:  # noqa: BLE001 (pyo3 panics are BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return Read(False, error=f"{type(e).__name__}: {e}")


def cpp_read(path) -> Read:
    """The runtime's reader, through sdengine._C."""
    from sdengine import _C

    try:
        tensors, metadata = _C.read_safetensors(str(path))
    except ValueError as e:
        return Read(False, error=str(e))
    return Read(True, {k: (d, tuple(s), b) for k, (d, s, b) in tensors.items()}, metadata)


def same(a: Read, b: Read) -> bool:
    return a.ok == b.ok and (not a.ok or (a.tensors == b.tensors and a.metadata == b.metadata))


# ---------------------------------------------------------------------------
# Seed files
# ---------------------------------------------------------------------------

def _save(tensors: dict, path: Path, metadata=None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def seed_files(folder) -> list:
    """Real files written by the safetensors library: the tiny SD1 UNet (fp16), part of its
    VAE and text encoder, and a small file with every torch dtype the format has, metadata,
    scalars and empty tensors."""
    from .tiny import tiny_pipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe = tiny_pipeline("sd15")
    unet = {k: v.half() for k, v in pipe.unet.state_dict().items()}
    vae = dict(list(pipe.vae.state_dict().items())[:40])
    text = {k: v for k, v in pipe.text_encoder.state_dict().items() if "token_embedding" not in k}
    generator = torch.Generator().manual_seed(0)
    zoo = {}
    for i, (name, dtype) in enumerate(sorted(TORCH_DTYPES.items())):
        shape = (2, 4) if i % 3 else (8,)
        raw = torch.randint(0, 256, (math.prod(shape) * max(1, torch.empty((), dtype=dtype).element_size()),),
                            generator=generator, dtype=torch.uint8)
        zoo[f"zoo.{name.lower()}"] = raw.view(dtype).reshape(shape[:-1] + (-1,))
    zoo["zoo.scalar"] = torch.tensor(1.5, dtype=torch.float64)
    zoo["zoo.empty"] = torch.empty(0, 3)
    zoo["zoo.bool"] = torch.tensor([True, False, True])
    metadata = {"format": "pt", "modelspec.prediction_type": "epsilon", "note": "é ☃ \\ \" \n"}
    return [
        _save(unet, folder / "unet.safetensors"),
        _save(vae, folder / "vae.safetensors", {"format": "pt"}),
        _save(text, folder / "text_encoder.safetensors"),
        _save(zoo, folder / "zoo.safetensors", metadata),
    ]


# ---------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------

def split(buf: bytes):
    """(header length field, header bytes, data bytes); the header cut to what the file holds."""
    n = struct.unpack("<Q", buf[:8])[0] if len(buf) >= 8 else 0
    return n, buf[8:8 + n], buf[8 + n:]


def assemble(header: bytes, data: bytes, pad: bool = True) -> bytes:
    if pad:  # as writers do: spaces up to a multiple of 8
        header = header + b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode()


def _nested(depth: int, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "[" * depth + "]" * depth
    return '{"y":' * depth + "1" + "}" * depth


WEIRD_VALUES = ["null", "true", "1e400", "-1e400", "1e-400", "123456789012345678901234567890", "-0", "0.0e-0",
                "NaN", "Infinity", '"\\ud800"', '"\\udc00"', '"\\ud83d\\ude00"', '"a\\x"', '"\\u0000"',
                '"\x01"', '"\x7f"', "1.", ".5", "+1", "01", "-", "[1,]", "{}", '{"a":1,"a":2}', '"é"']
SIZES = [0, 1, 2, 3, 4, 7, 8, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]
BAD_UTF8 = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80", b"\xf0\x9f\x98"]
GOOD_UTF8 = ["é", "😀", "\u2603", "\U0010ffff", "\x7f"]


class Mutator:
    """Draws mutants of seed files. Each mutant applies one to three operators."""

    def __init__(self, seeds: list, rng: random.Random):
        self.seeds = [(Path(p).name, Path(p).read_bytes()) for p in seeds]
        self.rng = rng
        self.ops = [m for m in dir(self) if m.startswith("op_")]

    def mutant(self) -> tuple[str, bytes]:
        rng = self.rng
        # The zoo (every dtype, metadata) twice as often as each tiny network's file.
        name, buf = rng.choices(self.seeds, weights=[2 if name == "zoo.safetensors" else 1 for name, _ in self.seeds])[0]
        ops = [rng.choice(self.ops) for _ in range(rng.choices([1, 2, 3], weights=[6, 3, 1])[0])]
        for op in ops:
            try:
                buf = getattr(self, op)(buf)
            except (ValueError, KeyError, IndexError, TypeError, struct.error):
                pass  # a header too broken for this operator: keep the mutant as it is
        return f"{name}:{'+'.join(o[3:] for o in ops)}", buf

    # -- helpers --------------------------------------------------------------------

    def _header(self, buf):
        n, header, data = split(buf)
        obj = json.loads(header.decode("utf-8"))
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        return obj, data

    def _tensor(self, obj):
        names = [k for k, v in obj.items() if k != "__metadata__" and isinstance(v, dict)]
        return self.rng.choice(names)

    def _rebuild(self, obj, data, pad=None):
        return assemble(_dumps(obj), data, pad=self.rng.random() < 0.8 if pad is None else pad)

    # -- byte level -----------------------------------------------------------------

    def op_flip_bytes(self, buf):
        b = bytearray(buf)
        for _ in range(self.rng.randint(1, 4)):
            b[self.rng.randrange(len(b))] ^= self.rng.randint(1, 255)
        return bytes(b)

    def op_flip_header_bytes(self, buf):
        n, header, _ = split(buf)
        b = bytearray(buf)
        for _ in range(self.rng.randint(1, 3)):
            b[8 + self.rng.randrange(max(1, len(header)))] ^= 1 << self.rng.randrange(8)
        return bytes(b)

    def op_flip_data_bytes(self, buf):
        n, header, data = split(buf)
        if not data:
            return buf
        b = bytearray(buf)
        for _ in range(self.rng.randint(1, 8)):
            b[8 + len(header) + self.rng.randrange(len(data))] ^= self.rng.randint(1, 255)
        return bytes(b)

    def op_truncate(self, buf):
        n = split(buf)[0]
        cut = self.rng.choice([self.rng.randrange(9), self.rng.randrange(8, 8 + n + 1), self.rng.randrange(len(buf)),
                               len(buf) - 1, len(buf) - self.rng.randint(1, 16)])
        return buf[:max(0, cut)]

    def op_append(self, buf):
        return buf + bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 16)))

    def op_header_length(self, buf):
        n = split(buf)[0]
        new = self.rng.choice([n + self.rng.randint(-8, 8), 0, 1, 2**63, 2**64 - 1, len(buf), len(buf) - 8,
                               100_000_000, 100_000_001, n - 1])
        return struct.pack("<Q", new % 2**64) + buf[8:]

    def op_length_into_padding(self, buf):
        """Shorten the header length into its trailing spaces (still valid JSON): the data then
        starts too early."""
        n, header, data = split(buf)
        padding = len(header) - len(header.rstrip(b" "))
        if padding == 0:  # make some: a header padded to 8 bytes
            header = header + b" " * 7
            buf = struct.pack("<Q", len(header)) + header + data
            padding, n = 7, len(header)
        return struct.pack("<Q", n - self.rng.randint(1, padding)) + buf[8:]

    def op_padding_chars(self, buf):
        n, header, data = split(buf)
        body = header.rstrip(b" ")
        pad = self.rng.choice([b" ", b"\n", b"\t", b"\r", b"\x0c", b"\x0b", b"\x00", b"  \n\t"])
        pad = (pad * 8)[:max(1, len(header) - len(body))]
        return assemble(body + pad, data, pad=False)

    # -- the header's structure -------------------------------------------------------

    def op_dtype(self, buf):
        obj, data = self._header(buf)
        name = self._tensor(obj)
        old = obj[name]["dtype"]
        same_size = [d for d, bits in DTYPE_BITS.items() if bits == DTYPE_BITS.get(old)]
        choices = [self.rng.choice(same_size), self.rng.choice(list(DTYPE_BITS)),
                   self.rng.choice(["f16", "F17", "", "FLOAT", 1, None, {old: None}, {old: {}}, [old], {}])]
        obj[name]["dtype"] = self.rng.choice(choices)
        return self._rebuild(obj, data)

    def op_shape(self, buf):
        obj, data = self._header(buf)
        name = self._tensor(obj)
        shape = list(obj[name]["shape"])
        rng = self.rng
        kind = rng.randrange(9)
        if kind == 0 and shape:
            i = rng.randrange(len(shape))
            shape[i] += rng.choice([-1, 1])
        elif kind == 1 and len(shape) >= 2:  # same element count
            i, j = rng.sample(range(len(shape)), 2)
            shape[i], shape[j] = shape[j], shape[i]
        elif kind == 2 and shape and shape[0] % 2 == 0:
            shape = [2, shape[0] // 2] + shape[1:]
        elif kind == 3:
            shape.insert(rng.randrange(len(shape) + 1), 1)
        elif kind == 4 and len(shape) >= 2:
            shape = [math.prod(shape)]
        elif kind == 5 and shape:
            shape[rng.randrange(len(shape))] = rng.choice(SIZES + [-1, 2.0, "2", None])
        elif kind == 6:
            shape = []
        elif kind == 7:
            shape = rng.choice([[2**32, 2**32], [2**62, 4], [2**63 - 1, 0], [0, 2**62, 2**62], [0, 2**32, 2**31],
                                [2**64 - 1, 0], [0, 2**63], [3, 2**63 // 3 + 1], [2**32, 2**31, 0, 2]])
        else:
            shape = shape + [rng.choice([0, 1, 2])]
        obj[name]["shape"] = shape
        return self._rebuild(obj, data)

    def op_offsets(self, buf):
        obj, data = self._header(buf)
        name = self._tensor(obj)
        begin, end = obj[name]["data_offsets"]
        rng = self.rng
        kind = rng.randrange(6)
        if kind == 0:
            begin += rng.choice([-1, 1, -8, 8])
        elif kind == 1:
            end += rng.choice([-1, 1, -8, 8])
        elif kind == 2:
            other = self._tensor(obj)
            obj[name]["data_offsets"], obj[other]["data_offsets"] = obj[other]["data_offsets"], [begin, end]
            return self._rebuild(obj, data)
        elif kind == 3:
            begin, end = end, begin
        elif kind == 4:
            begin, end = rng.choice(SIZES), rng.choice(SIZES)
        else:
            obj[name]["data_offsets"] = rng.choice([[begin], [begin, end, end], [float(begin), end], [str(begin), end],
                                                    [-begin, end], {"0": begin}])
            return self._rebuild(obj, data)
        obj[name]["data_offsets"] = [begin, end]
        return self._rebuild(obj, data)

    def op_duplicate_entry(self, buf):
        """The same data range under a second name: overlapping ranges."""
        obj, data = self._header(buf)
        name = self._tensor(obj)
        obj[name + self.rng.choice([".copy", "_", " "])] = dict(obj[name])
        return self._rebuild(obj, data)

    def op_duplicate_key(self, buf):
        """A name written twice in the JSON text (the last one counts, if both are well formed)."""
        obj, data = self._header(buf)
        name = self._tensor(obj)
        first = self.rng.choice([obj[name], 5, {"dtype": "F16"}, dict(obj[name], dtype="F64"), obj[name]])
        key = self.rng.choice([name, name, "__metadata__"])
        text = _dumps(obj)
        extra = _dumps({key: first})[1:-1]
        return assemble(b"{" + extra + b"," + text[1:], data)

    def op_rename(self, buf):
        obj, data = self._header(buf)
        name = self._tensor(obj)
        others = [k for k in obj if k != name]
        new = self.rng.choice(["", "é😀", "__metadata__", "a\u0000b", "x" * 300, name.upper(), name + "\n"] +
                              ([self.rng.choice(others)] if others else []))
        obj = {(new if k == name else k): v for k, v in obj.items()} if new not in obj else \
            {k: v for k, v in obj.items() if k != name} | {new: obj[name]}
        return self._rebuild(obj, data)

    def op_reorder(self, buf):
        obj, data = self._header(buf)
        items = list(obj.items())
        self.rng.shuffle(items)
        return self._rebuild(dict(items), data)

    def op_array_form(self, buf):
        obj, data = self._header(buf)
        name = self._tensor(obj)
        info = obj[name]
        form = [info["dtype"], info["shape"], info["data_offsets"]]
        obj[name] = self.rng.choice([form, form, form[:2], form + [0], {"dtype": {info["dtype"]: None},
                                                                          "shape": info["shape"],
                                                                          "data_offsets": info["data_offsets"]}])
        return self._rebuild(obj, data)

    def op_extra_field(self, buf):
        obj, data = self._header(buf)
        name = self._tensor(obj)
        value = self.rng.choice(WEIRD_VALUES + [_nested(self.rng.randint(118, 130), self.rng)])
        text = _dumps(obj)
        key = _dumps(name)
        at = text.index(key + b":{") + len(key) + 2
        field_ = self.rng.choice([b'"extra"', b'"dtype"', b'"shape"', b'"data_offsets"', b'"extra"'])
        return assemble(text[:at] + field_ + b":" + value.encode() + b"," + text[at:], data)

    def op_nesting(self, buf):
        """Deep nesting around the limit of the reference's JSON parser (127 levels)."""
        obj, data = self._header(buf)
        name = self._tensor(obj)
        depth = self.rng.randint(120, 130)
        text = _dumps(obj)
        key = _dumps(name)
        at = text.index(key + b":{") + len(key) + 2
        return assemble(text[:at] + b'"deep":' + _nested(depth, self.rng).encode() + b"," + text[at:], data)

    def op_metadata(self, buf):
        obj, data = self._header(buf)
        value = self.rng.choice([{"k": "v"}, {"k": 1}, None, [], "x", {"k": None}, {"k": {"a": "b"}}, {},
                                 {"é": "😀", "": ""}, {"k": ["v"]}, {"format": "pt", "n": "1" * 100}, {"k": 1.5}])
        if self.rng.random() < 0.2:
            text = _dumps(obj)
            return assemble(b'{"__metadata__":' + _dumps(value) + b"," + text[1:], data)
        obj["__metadata__"] = value
        items = list(obj.items())
        self.rng.shuffle(items)
        return self._rebuild(dict(items), data)

    def op_utf8(self, buf):
        n, header, data = split(buf)
        quotes = [i for i, c in enumerate(header) if c == ord('"')]
        if len(quotes) < 2:
            return buf
        at = self.rng.choice(quotes[:-1]) + 1
        insert = self.rng.choice(BAD_UTF8) if self.rng.random() < 0.6 else self.rng.choice(GOOD_UTF8).encode()
        return assemble(header[:at] + insert + header[at:], data, pad=False)

    def op_escapes(self, buf):
        obj, data = self._header(buf)
        name = self._tensor(obj)
        text = _dumps(obj)
        key = _dumps(name)
        if len(name) == 0:
            return buf
        i = self.rng.randrange(len(name))
        escaped = self.rng.choice([f"\\u{ord(name[i]):04x}" if ord(name[i]) < 0x10000 else name[i], "\\ud800",
                                   "\\udc00x", "\\q", "\\/", "\\u12", name[i]])
        new_key = ('"' + name[:i] + escaped + name[i + 1:] + '"').encode()
        return assemble(text.replace(key + b":", new_key + b":", 1), data)

    def op_numbers(self, buf):
        """The same offsets written other ways: some JSON reads as integers, some not."""
        obj, data = self._header(buf)
        name = self._tensor(obj)
        begin, end = obj[name]["data_offsets"]
        text = _dumps(obj)
        old = _dumps([begin, end])
        form = self.rng.choice([f"{end}.0", f"{end}e0", f"0{end}", f"+{end}", f" {end} ", f"{end}E+0", "-0",
                                f"{end}\n"])
        return assemble(text.replace(old, f"[{begin},{form}]".encode(), 1), data)

    def op_int_overflow(self, buf):
        obj, data = self._header(buf)
        name = self._tensor(obj)
        rng = self.rng
        obj[name]["shape"] = rng.choice([[2**32, 2**32], [2**62, 4], [2**63, 2], [2**64 - 1], [2**61, 8],
                                         [2**31, 2**31, 2**2], [2**64 - 1, 2**64 - 1, 0], [0, 2**64 - 1, 2]])
        if rng.random() < 0.5:
            obj[name]["data_offsets"] = [obj[name]["data_offsets"][0], rng.choice([2**63, 2**64 - 1, 0])]
        return self._rebuild(obj, data)

    def op_json_syntax(self, buf):
        n, header, data = split(buf)
        body = header.rstrip(b" ")
        rng = self.rng
        kind = rng.randrange(10)
        if kind == 0:
            body = body[:-1] + b",}"
        elif kind == 1:
            body = body[:-1]
        elif kind == 2:
            body = b"\xef\xbb\xbf" + body
        elif kind == 3:
            body = rng.choice([b" ", b"\n", b"\t\r\n "]) + body
        elif kind == 4:
            body = b"/*c*/" + body
        elif kind == 5:
            body = body.replace(b'"', b"'", 2)
        elif kind == 6:
            body = body + b" x"
        elif kind == 7:
            body = b"[" + body + b"]"
        elif kind == 8:
            i = rng.randrange(len(body))
            body = body[:i] + body[i + 1:]
        else:
            body = body.replace(b":", b" : ", 3).replace(b",", b" ,\n", 3)
        return assemble(body, data, pad=rng.random() < 0.5)


# ---------------------------------------------------------------------------
# A differential run
# ---------------------------------------------------------------------------

@dataclass
class Report:
    mutants: int = 0
    accepted: int = 0
    rejected: int = 0
    disagreements: list = field(default_factory=list)
    slowest_s: float = 0.0
    tensors_compared: int = 0

    def line(self) -> str:
        return (f"{self.mutants} mutants: {self.accepted} accepted and {self.rejected} refused by both readers, "
                f"{len(self.disagreements)} disagreements, {self.tensors_compared} accepted tensors byte-equal, "
                f"slowest read {self.slowest_s * 1000:.1f} ms")


def run_differential(mutator, count: int, ours, folder, compare=None, keep_disagreements=None, reference=None,
                     suffix=".safetensors") -> Report:
    """`count` mutants through `reference(path) -> Read` (default: the safetensors library) and
    `ours(path) -> Read` (timed); a disagreement is a different acceptance or, when both accept,
    different tensors or metadata (`compare`, default same())."""
    compare = compare or same
    reference = reference or reference_read
    report = Report()
    folder = Path(folder)
    for i in range(count):
        label, buf = mutator.mutant()
        path = folder / f"mutant-{i}{suffix}"
        path.write_bytes(buf)
        expected = reference(path)
        start = time.perf_counter()
        got = ours(path)
        elapsed = time.perf_counter() - start
        if elapsed > 0.5:  # a stall of the machine (or the garbage collector), or the reader? Time it again.
            start = time.perf_counter()
            ours(path)
            elapsed = min(elapsed, time.perf_counter() - start)
        report.slowest_s = max(report.slowest_s, elapsed)
        report.mutants += 1
        if not compare(expected, got):
            report.disagreements.append((label, expected.ok, expected.error[:200], got.ok, got.error[:200]))
            if keep_disagreements is not None:
                (Path(keep_disagreements) / f"disagreement-{i}{suffix}").write_bytes(buf)
        elif got.ok:
            report.accepted += 1
            report.tensors_compared += len(expected.tensors)  # the driver compares them by digest
        else:
            report.rejected += 1
        path.unlink()
    return report


class Driver:
    """tests/c/fuzz_reader.cpp as `ours`: one process reading path after path."""

    def __init__(self, exe, *mode):
        self.proc = subprocess.Popen([str(exe), *(mode or ("safetensors",))], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", bufsize=1)

    def __call__(self, path, timeout: float = 60.0) -> Read:
        import select

        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:  # a hang fails, it does not stall CI
            self.proc.kill()
            raise RuntimeError(f"the reader hung on {path} (no answer in {timeout:.0f} s)")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the reader died on {path} (exit status {self.proc.wait()})")
        status, _, rest = line.rstrip("\n").partition(" ")
        return DigestRead(status == "ok", rest.strip() if status == "ok" else "", error=rest)

    def close(self) -> int:
        self.proc.stdin.close()
        return self.proc.wait()


class DigestRead(Read):
    """A driver's answer: accepted with a digest, or refused."""

    def __init__(self, ok, digest_hex, error=""):
        super().__init__(ok, error=error)
        self.digest_hex = digest_hex


def same_as_driver(expected: Read, got: Read) -> bool:
    if isinstance(got, DigestRead):
        return expected.ok == got.ok and (not got.ok or expected.digest() == got.digest_hex)
    return same(expected, got)


# ---------------------------------------------------------------------------
# engine.json
# ---------------------------------------------------------------------------

def engine_meta_for(config, folder) -> dict:
    """The engine.json that export/aoti.py build_engine writes for `config` (CPU, fp32), with
    the networks' constants taken from their state dicts instead of a compile: a realistic
    seed, made in a second. Its single-file tokenizer folder is written into `folder`."""
    from sdengine.export import aoti
    from sdengine.lora import lora_names
    from sdengine.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        modules = {"text_encoder": CLIPTextModel(config.text_encoder), "unet": UNet2DConditionModel(config.unet),
                   "vae_decoder": AutoencoderKL(config.vae), "vae_encoder": AutoencoderKL(config.vae)}
    components = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}
    networks = {}
    for name, module in modules.items():
        constants = {aoti.PREFIX + k: list(v.shape) for k, v in module.state_dict().items()}
        networks[name] = {"package": f"{name}.pt2", "component": components[name], "prefix": aoti.PREFIX,
                          "constants": constants, "ldm": aoti._ldm_sources(config, components[name], constants),
                          "compile_s": 1.5}
    return {"format": aoti.FORMAT_VERSION, "torch_version": torch.__version__, "device": "cpu", "dtype": "fp32",
            "cpu_capability": aoti.cpu_capability(), "latent_multiple": 2, "max_batch": aoti.MAX_BATCH,
            "max_latent": aoti.MAX_LATENT, "max_prompt_windows": aoti.MAX_WINDOWS, "config": config.to_dict(),
            "networks": networks,
            "single_file": aoti._single_file_info(config, folder),
            "lora": {name: f"{c}/{k}" for name, (c, k) in lora_names(config).items()}}


def json_equal(a, b) -> bool:
    """Equal values of the same JSON types (1 and 1.0 differ; NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(json_equal(a[k], b[k]) for k in a)
    return a == b


class JsonRead(Read):
    def __init__(self, ok, value=None, error=""):
        super().__init__(ok, error=error)
        self.value = value


def reference_engine(path) -> Read:
    """export/engine_meta.py: Python's json module and the engine.json rules."""
    from sdengine.export.engine_meta import EngineMetaError, check_engine_meta, loads

    try:
        meta = loads(Path(path).read_bytes())
        check_engine_meta(meta)
    except EngineMetaError as e:
        return JsonRead(False, error=str(e))
    return JsonRead(True, meta)


def cpp_engine(path) -> Read:
    from sdengine import _C

    try:
        return JsonRead(True, _C.read_engine_json(str(path)))
    except ValueError as e:
        return JsonRead(False, error=str(e))


def same_engine(a: Read, b: Read) -> bool:
    if isinstance(b, DigestRead):
        return a.ok == b.ok
    return a.ok == b.ok and (not a.ok or json_equal(a.value, b.value))


class EngineMutator(Mutator):
    """Mutants of engine.json: its values (types, ranges, names, file names), keys (dropped,
    renamed, doubled), nesting, and the bytes (flips, truncation, invalid UTF-8)."""

    def __init__(self, seeds: list, rng: random.Random):
        self.seeds = [(Path(p).name, Path(p).read_bytes()) for p in seeds]
        self.rng = rng
        self.ops = [m for m in dir(self) if m.startswith("eop_")]

    def mutant(self) -> tuple[str, bytes]:
        name, buf = self.rng.choice(self.seeds)
        ops = [self.rng.choice(self.ops) for _ in range(self.rng.choices([1, 2], weights=[3, 1])[0])]
        for op in ops:
            try:
                buf = getattr(self, op)(buf)
            except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
                pass
        return f"{name}:{'+'.join(o[4:] for o in ops)}", buf

    def _paths(self, obj, prefix=()):
        """Every (path, value) of the document, containers included."""
        yield prefix, obj
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from self._paths(v, prefix + (k,))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                yield from self._paths(v, prefix + (i,))

    def _pick(self, obj, shallow=0.7):
        """A path, biased to the keys the runtime reads (not deep inside constants)."""
        paths = [p for p, _ in self._paths(obj) if p]
        interesting = [p for p in paths if not (len(p) > 3 and p[0] == "networks" and p[2] in ("constants", "ldm"))]
        return self.rng.choice(interesting if self.rng.random() < shallow else paths)

    @staticmethod
    def _set(obj, path, value):
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value

    @staticmethod
    def _get(obj, path):
        for k in path:
            obj = obj[k]
        return obj

    def _load(self, buf):
        return json.loads(buf.decode("utf-8"))

    def _dump(self, obj) -> bytes:
        return json.dumps(obj, indent=self.rng.choice([None, 1]), ensure_ascii=self.rng.random() < 0.5).encode()

    def eop_value(self, buf):
        obj = self._load(buf)
        path = self._pick(obj)
        value = self._get(obj, path)
        choices = [None, True, False, 0, -1, 1, 3, 2**31, 2**63, 10**30, 1.5, float("nan"), float("inf"), "", "x",
                   [], {}, [1, 2], "../../etc/passwd.pt2", ".hidden.pt2", "unet.so", "a/b.pt2", "cuda", "fp8",
                   "v_prediction", "sample", "m.", 2.0]
        if isinstance(value, int) and not isinstance(value, bool):
            choices += [value + 1, value - 1, -value, float(value), value * 10**6]
        if isinstance(value, str):
            choices += [value.upper(), value + "x", value[:-1], "." + value, value + "\ud800"]
        self._set(obj, path, self.rng.choice(choices))
        return self._dump(obj)

    def eop_drop_key(self, buf):
        obj = self._load(buf)
        path = self._pick(obj)
        parent = self._get(obj, path[:-1])
        if isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, list):
            parent.pop(path[-1])
        return self._dump(obj)

    def eop_rename_key(self, buf):
        obj = self._load(buf)
        path = self._pick(obj)
        parent = self._get(obj, path[:-1])
        if not isinstance(parent, dict):
            return buf
        new = self.rng.choice([path[-1].upper(), path[-1] + " ", "vae_decoder", "text_encoder_2", "m.x", "extra"])
        items = [(new if k == path[-1] else k, v) for k, v in parent.items()]
        parent.clear()
        parent.update(items)
        return self._dump(obj)

    def eop_duplicate_key(self, buf):
        """A key written twice (Python's json keeps the last; the rules refuse it)."""
        text = buf.decode("utf-8")
        key = self.rng.choice(['"format"', '"dtype"', '"package"', '"constants"', '"scaling_factor"', '"tokenizer"'])
        at = text.find(key + ":")
        if at < 0:
            return buf
        return (text[:at] + key + ': 3, ' + text[at:]).encode()

    def eop_nesting(self, buf):
        obj = self._load(buf)
        depth = self.rng.randint(10, 20)
        nested = json.loads("[" * depth + "]" * depth) if self.rng.random() < 0.5 else json.loads(
            '{"y":' * depth + "1" + "}" * depth)
        path = self._pick(obj)
        parent = self._get(obj, path[:-1])
        if isinstance(parent, dict):
            parent["deep"] = nested
        return self._dump(obj)

    def eop_text(self, buf):
        rng = self.rng
        kind = rng.randrange(10)
        if kind == 0:
            return buf[:rng.randrange(len(buf))]
        if kind == 1:
            b = bytearray(buf)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            return bytes(b)
        if kind == 2:
            at = rng.randrange(len(buf))
            return buf[:at] + rng.choice(BAD_UTF8) + buf[at:]
        if kind == 3:
            return b"\xef\xbb\xbf" + buf
        if kind == 4:
            return buf + rng.choice([b" x", b"\n\n", b"}", b"\x00"])
        if kind == 5:
            return buf.replace(b": 3,", b": 3.0,", 1).replace(b":3,", b":3.0,", 1)
        if kind == 6:
            return buf.replace(b'"max_batch": 64', b'"max_batch": ' + b"1" * rng.choice([20, 4300, 4301]), 1)
        if kind == 7:
            return buf.replace(b'"epsilon"', rng.choice([b'"\\u0065psilon"', b'"\\ud800"', b'"eps\\u0000"']), 1)
        if kind == 8:
            return buf.replace(b"0.18215", rng.choice([b"NaN", b"-Infinity", b"1e400", b"-0", b"0"]), 1)
        return rng.choice([b"", b"[]", b"null", b"{}", b"\x00" * 8])


# ---------------------------------------------------------------------------
# Single-file (LDM) checkpoints mapped onto an engine
# ---------------------------------------------------------------------------

def ldm_seed(folder) -> tuple[Path, Path]:
    """The tiny SD1 pipeline as an A1111 single file (fp16, tests/support/ldm_keys.py, with a modelspec
    header) and the engine.json of its architecture."""
    from .ldm_keys import save_ldm_single_file
    from safetensors.torch import load_file, save_file

    from sdengine.config import tiny_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = save_ldm_single_file("sd15", folder / "tiny-sd15.safetensors", dtype=torch.float16)
    save_file(load_file(str(path)), str(path), metadata={"modelspec.architecture": "stable-diffusion-v1"})
    engine_json = folder / "engine.json"
    engine_json.write_text(json.dumps(engine_meta_for(tiny_config("sd15"), folder)))
    return path, engine_json


def reference_single_file(path, meta: dict) -> Read:
    """The safetensors library, then the engine's single-file sources applied with
    sdengine.ldm_layout's transforms and shape rules, as the Python loader applies them (the
    first source present wins)."""
    from sdengine.ldm_layout import apply_transform, same_up_to_unit_dims, transformed_shape

    read = reference_read(path)
    if not read.ok:
        return read
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for name, net in meta["networks"].items():
        ldm, component, prefix = net.get("ldm") or {}, net["component"], net["prefix"]
        for fqn, shape in net["constants"].items():
            sources = ldm.get(fqn)
            if not sources:
                continue
            present = [(key, transform) for key, transform in sources if key in state]
            if not present:
                return Read(False, error=f"no {sources[0][0]!r}")
            key, transform = present[0]
            tensor = state[key]
            if transform in ("q", "k", "v") and (tensor.dim() < 1 or tensor.shape[0] % 3):
                return Read(False, error=f"{key!r} is not a fused q, k, v projection")
            if transform == "transpose" and tensor.dim() != 2:
                return Read(False, error=f"{key!r} is not a matrix")
            found = transformed_shape(tuple(tensor.shape), transform)
            if found != tuple(shape) and not same_up_to_unit_dims(found, tuple(shape)):
                return Read(False, error=f"{key!r} has shape {found}, the engine expects {shape}")
            tensor = apply_transform(tensor, transform).reshape(shape)
            out[f"{component}/{fqn[len(prefix):]}"] = (DTYPE_NAMES[tensor.dtype], tuple(tensor.shape),
                                                        tensor_bytes(tensor))
    return Read(True, out)


def cpp_single_file(engine_json):
    def read(path) -> Read:
        from sdengine import _C

        try:
            weights = _C.single_file_weights(str(path), str(engine_json))
        except ValueError as e:
            return Read(False, error=str(e))
        return Read(True, {k: (d, tuple(s), b) for k, (d, s, b) in weights.items()})
    return read


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["safetensors", "engine", "single-file", "all"])
    parser.add_argument("--driver", required=True, help="the compiled tests/c/fuzz_reader.cpp")
    parser.add_argument("--count", type=int, default=300, help="mutants of each kind")
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args(argv)
    kinds = ["safetensors", "engine", "single-file"] if args.kind == "all" else [args.kind]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind in kinds:
            rng = random.Random(args.seed)
            if kind == "safetensors":
                mutator, driver, reference = Mutator(seed_files(tmp / "seeds"), rng), Driver(args.driver), None
                compare, suffix = same_as_driver, ".safetensors"
            elif kind == "engine":
                engine = tmp / "engine" / "engine.json"
                from sdengine.config import tiny_config

                engine.parent.mkdir(parents=True, exist_ok=True)
                engine.write_text(json.dumps(engine_meta_for(tiny_config("sd15"), engine.parent), indent=1))
                mutator, driver, reference = EngineMutator([engine], rng), Driver(args.driver, "engine"), \
                    reference_engine
                compare, suffix = same_engine, ".json"
            else:
                ldm, engine = ldm_seed(tmp / "ldm")
                meta = json.loads(engine.read_text())
                mutator = Mutator([ldm], rng)
                driver = Driver(args.driver, "single-file", str(engine))
                reference = lambda path, meta=meta: reference_single_file(path, meta)  # noqa: E731
                compare, suffix = same_as_driver, ".safetensors"
            report = run_differential(mutator, args.count, driver, tmp, compare=compare, reference=reference,
                                      suffix=suffix)
            status = driver.close()
            print(f"{kind} under the driver: {report.line()}")
            for d in report.disagreements[:20]:
                print("DISAGREEMENT", d)
            if status != 0:
                print(f"the driver exited with status {status}")
            failures += len(report.disagreements) + (status != 0)
    return failures


if __name__ == "__main__":
    sys.exit(main())
