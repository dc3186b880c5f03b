"""`sdengine serve`'s OpenAPI schema tells the truth (issue 29): schemathesis, every check, on
every operation, finds no request the schema calls valid that the server refuses, none it
calls invalid that the server serves, no undocumented status code or content type, no 5xx.

The server runs the demo model in this process with small caps (so that the largest request
the schema allows takes well under the per-request limit); schemathesis' CLI runs with a fixed
seed and a bounded number of examples, its image strings drawn by support/schemathesis_hooks.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'sdengine[serve]'")
pytest.importorskip("schemathesis", reason="needs schemathesis: pip install 'sdengine[test]'")
httpx = pytest.importorskip("httpx")

from sdengine.serve.app import ServeSettings  # noqa: E402
from sdengine.serve.cli import build_local_app  # noqa: E402
from support.server import InProcessServer  # noqa: E402

TESTS = Path(__file__).resolve().parent
CAPS = dict(max_size=64, max_steps=10, max_batch_size=2, max_batch_count=1)


@pytest.fixture(scope="module")
def server():
    with InProcessServer(build_local_app(None, ServeSettings(**CAPS))) as srv:
        yield srv


def test_schema_states_the_servers_caps_and_model(server):
    schema = httpx.get(server.url + "/openapi.json", timeout=60).json()
    parts = schema["components"]["schemas"]
    txt2img = parts["Txt2ImgRequest"]["properties"]

    def value(prop):
        return next(b for b in prop.get("anyOf", [prop]) if b.get("type") != "null")

    assert [value(txt2img[f])["maximum"] for f in ("width", "height", "steps", "batch_size", "n_iter")] == [
        64, 64, 10, 2, 1]
    assert txt2img["width"]["default"] == 32 and txt2img["steps"]["default"] == 10  # demo size; 50 within the cap
    assert parts["Img2ImgRequest"]["properties"]["init_images"]["minItems"] == 1
    assert value(txt2img["seed"])["maximum"] == 2 ** 63 - 1
    assert {"Euler a", "DPM++ 2M", "k_euler_a", "euler_a"} <= set(value(txt2img["sampler_name"])["enum"])
    hr_resize = value(txt2img["hr_resize_y"])
    assert hr_resize["type"] == "integer"
    assert httpx.post(server.url + "/sdapi/v1/txt2img", json={"hr_resize_y": False}).status_code == 422
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    assert "400" in schema["paths"]["/sdapi/v1/txt2img"]["post"]["responses"]
    r = httpx.post(server.url + "/sdapi/v1/txt2img", content=b"\xff\xfe{", headers={"Content-Type": "application/json"})
    assert r.status_code == 400  # bytes that are not text; text that is not JSON is FastAPI's 422
    # a multistep sampler's fewest steps is a clause of the schema, and the server's refusal
    # what a sampler needs is a clause of the schema, as the server refuses it
    clause = next(c for c in parts["Txt2ImgRequest"]["anyOf"] if c["description"].startswith("dpmpp_2m,"))
    assert "at least 2 steps" in clause["description"]
    r = httpx.post(server.url + "/sdapi/v1/txt2img", json={"sampler_name": "dpmpp_2m", "steps": 1}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][1] in ("steps", "sampler_name"), r.text


@pytest.mark.slow  # some minutes on 2 cores: every phase (coverage, fuzzing, stateful) generates images
def test_schemathesis_all_checks_find_nothing(server, tmp_path):
    env = dict(os.environ, SCHEMATHESIS_HOOKS="support.schemathesis_hooks",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json", "--checks", "all",
         "--max-examples", "25", "--seed", "1", "--workers", "1", "--max-response-time", "10"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    tail = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert "No issues found" in run.stdout, tail
    operations = httpx.get(server.url + "/openapi.json").json()["paths"]
    count = sum(len(methods) for methods in operations.values())
    assert count >= 14 and f"Tested: {count}" in run.stdout, tail  # every operation took part
