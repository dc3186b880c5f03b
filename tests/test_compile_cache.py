"""The compile caches' archive (sdengine/compile_cache.py): what a GPU window carries from one
fresh machine to the next. Round trip, the 64 MiB limit, and an archive from another setup
ignored with a warning, never trusted."""

import io
import json
import tarfile

import pytest

from sdengine import cli, compile_cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An SDE_CACHE_DIR with a few cache files, as Triton and Inductor leave them."""
    root = tmp_path / "machine-a"
    monkeypatch.setenv("SDE_CACHE_DIR", str(root))
    for variable in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.delenv(variable, raising=False)
    files = {"triton/ABCD/_attention_kernel.cubin": b"\x7fELF" + bytes(range(200)),
             "triton/ABCD/_attention_kernel.json": b'{"name": "_attention_kernel"}',
             "inductor/fxgraph/xy/entry": b"graph" * 100}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root, files


def _move_to(monkeypatch, root):
    monkeypatch.setenv("SDE_CACHE_DIR", str(root))
    for variable in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.delenv(variable, raising=False)


def test_export_then_import_on_a_fresh_machine(cache, tmp_path, monkeypatch, capsys):
    root, files = cache
    archive = tmp_path / "caches.tar.gz"
    assert cli.main(["cache", "export", str(archive)]) == 0
    assert "3 files" in capsys.readouterr().out
    manifest = json.loads(tarfile.open(archive).extractfile("sdengine-cache.json").read())
    assert manifest["fingerprint"] == compile_cache.fingerprint() and manifest["files"] == 3
    _move_to(monkeypatch, tmp_path / "machine-b")
    assert cli.main(["cache", "import", str(archive)]) == 0
    for name, data in files.items():
        assert (tmp_path / "machine-b" / name).read_bytes() == data


def test_an_archive_from_another_setup_is_ignored_with_a_warning(cache, tmp_path, monkeypatch):
    archive = tmp_path / "caches.tar.gz"
    compile_cache.export_archive(archive)
    # the same archive, as if made with another Triton on another GPU
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        for member, data in members:
            if member.name == "sdengine-cache.json":
                manifest = json.loads(data)
                manifest["fingerprint"].update(triton="3.0.0", gpu="NVIDIA A100", capability="8.0")
                data = json.dumps(manifest).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    _move_to(monkeypatch, tmp_path / "machine-b")
    with pytest.warns(UserWarning, match="ignoring the compile cache .*triton: archive '3.0.0'.*gpu: archive "
                                         "'NVIDIA A100'"):
        assert compile_cache.import_archive(other) is None
    assert not (tmp_path / "machine-b").exists()  # nothing of it was unpacked


def test_the_size_limit_writes_nothing(cache, tmp_path):
    archive = tmp_path / "caches.tar.gz"
    with pytest.raises(ValueError, match="over the 0 MiB limit .*3 files"):
        compile_cache.export_archive(archive, max_bytes=100)
    assert not archive.exists() and not list(tmp_path.glob(".caches.tar.gz.*"))


def test_bad_archives_are_refused_by_name(tmp_path, monkeypatch):
    _move_to(monkeypatch, tmp_path / "machine")
    with pytest.raises(FileNotFoundError, match="does not exist: .*missing.tgz"):
        compile_cache.import_archive(tmp_path / "missing.tgz")
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"not a tar file")
    with pytest.raises(ValueError, match="junk.tgz is not a cache archive"):
        compile_cache.import_archive(junk)
    # a member that would land outside the cache directory
    evil = tmp_path / "evil.tgz"
    manifest = json.dumps({"format": compile_cache.ARCHIVE_FORMAT, "fingerprint": compile_cache.fingerprint(),
                           "files": 1}).encode()
    with tarfile.open(evil, "w:gz") as tar:
        for name, data in (("sdengine-cache.json", manifest), ("triton/../../escaped", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="points outside the cache"):
        compile_cache.import_archive(evil)
    assert not (tmp_path / "escaped").exists()
