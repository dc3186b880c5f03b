"""`sdengine serve` (issue 18): the A1111 API against real clients.

The server runs in this process (uvicorn in a thread, loopback only) with the demo model;
the clients are the `webuiapi` package (AUTOMATIC1111's Python client, not written here)
and httpx.
"""

import base64
import io
import json
import sys
import threading
import time
import types

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'sdengine[serve]'")
webuiapi = pytest.importorskip("webuiapi")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

import sdengine  # noqa: E402
from sdengine import samplers  # noqa: E402
from sdengine.samplers.names import A1111_SAMPLERS, A1111_SCHEDULE_TABLE  # noqa: E402
from sdengine.serve.app import SAMPLER_LABELS, ServeSettings  # noqa: E402
from sdengine.serve.cli import build_local_app  # noqa: E402
from sdengine.serve.requests import check_plan, sampler_and_schedule  # noqa: E402
from support.server import InProcessServer  # noqa: E402

PROMPT = "a handwritten digit seven"


def serve(model=None, **settings):
    return InProcessServer(build_local_app(model, ServeSettings(**settings)), webuiapi)


@pytest.fixture(scope="module")
def server():
    with serve(batch_window_ms=300.0) as s:  # a wide window, so that concurrent requests share batches
        yield s


@pytest.fixture(scope="module")
def demo():
    return sdengine.load(None)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _b64_png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_webuiapi_txt2img_equals_generate(server):
    api = server.api(sampler="Euler a", steps=12)
    result = api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=11, width=32, height=32, cfg_scale=6.5,
                         batch_size=2)
    reference = sdengine.generate(PROMPT, negative_prompt="blurry", seed=11, steps=12, sampler="Euler a",
                                  guidance_scale=6.5, width=32, height=32, batch_size=2, progress=False,
                                  prompt_syntax="a1111")  # the A1111 API's prompts
    assert len(result.images) == 2
    for i, image in enumerate(result.images):
        assert image.format == "PNG" and image.size == (32, 32)
        assert np.array_equal(_pixels(image), _pixels(reference.images[i])), f"image {i} differs from generate()"
        assert image.info["parameters"] == reference.infotext(i)
    info = result.info  # webuiapi parsed the `info` JSON string
    assert info["all_seeds"] == [11, 12] and info["seed"] == 11 and info["steps"] == 12
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 6.5 and info["width"] == 32
    assert info["infotexts"] == [reference.infotext(0), reference.infotext(1)]
    assert result.parameters["prompt"] == PROMPT and result.parameters["seed"] == 11


def test_loras_list_and_prompt_tags(tmp_path):
    """GET /sdapi/v1/loras lists --lora-dir as A1111's Lora extension does; a <lora:name:weight>
    tag in the prompt merges it for that request (equal to generate() with the same syntax), an
    unknown name is a 422 naming the prompt, and a request without the tag is the base model."""
    from diffusers import StableDiffusionPipeline

    from sdengine.api import DEMO_MODEL
    from support.lora_files import kohya_lora

    kohya_lora(StableDiffusionPipeline.from_pretrained(str(DEMO_MODEL)), tmp_path / "ink.safetensors", rank=4,
               alpha=4.0, locon=False)
    with serve(lora_dir=str(tmp_path)) as srv:
        listed = httpx.get(srv.url + "/sdapi/v1/loras", timeout=30).json()
        assert [(e["name"], e["alias"], e["path"]) for e in listed] == [
            ("ink", "ink", str(tmp_path / "ink.safetensors"))]
        api = srv.api(sampler="Euler", steps=8)
        tagged = api.txt2img(prompt=PROMPT + " <lora:ink:0.8>", seed=3, width=32, height=32).image
        plain = api.txt2img(prompt=PROMPT, seed=3, width=32, height=32).image
        r = httpx.post(srv.url + "/sdapi/v1/txt2img", json={"prompt": PROMPT + " <lora:nosuch:1>", "steps": 2},
                       timeout=60)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "prompt"
        assert "unknown LoRA 'nosuch'" in r.json()["detail"][0]["msg"] and "ink" in r.json()["detail"][0]["msg"]
    reference = sdengine.generate(PROMPT + " <lora:ink:0.8>", seed=3, steps=8, sampler="Euler", guidance_scale=7.0,
                                  width=32, height=32, prompt_syntax="a1111", lora_dir=tmp_path, progress=False)
    assert np.array_equal(_pixels(tagged), _pixels(reference.images[0]))
    assert "Lora hashes" in tagged.info["parameters"]
    assert np.abs(_pixels(tagged).astype(int) - _pixels(plain).astype(int)).max() > 10  # the LoRA shows


def test_defaults_and_random_seed(server, demo):
    # No sampler, steps or size: A1111's sampler (Euler) and steps (50), the model's native size.
    r = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": -1, "unknown_field": 1},
                   timeout=60)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["steps"] == 50 and info["sampler_name"] == "Euler" and info["width"] == demo.config.default_size
    assert 0 <= info["seed"] < 4294967294
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.size == (demo.config.default_size,) * 2


def test_webuiapi_img2img_equals_pipeline(server, demo):
    source = demo(PROMPT, seed=3, steps=8, width=40, height=40, progress=False).images[0]  # resized by the server
    api = server.api(sampler="DPM++ 2M", steps=10)
    result = api.img2img(images=[source], prompt="a handwritten digit one", seed=5, width=32, height=32,
                         denoising_strength=0.6, cfg_scale=7.0)
    expected = demo("a handwritten digit one", negative_prompt="", init_image=source.resize((32, 32), Image.LANCZOS),
                    strength=0.6, seed=5, steps=10, sampler="DPM++ 2M", guidance_scale=7.0, width=32, height=32,
                    progress=False)
    assert np.array_equal(_pixels(result.image), _pixels(expected.images[0]))
    assert result.info["denoising_strength"] == 0.6
    assert "Denoising strength: 0.6" in result.image.info["parameters"]


def test_inpainting_with_an_inpainting_model(tmp_path):
    from support.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline("sd15-inpaint", tmp_path / "inpaint")
    pipe = sdengine.load(folder)
    size = pipe.config.default_size
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    with serve(str(folder)) as s:
        result = s.api(sampler="Euler", steps=6).img2img(images=[photo], mask_image=mask, prompt="a red square",
                                                         seed=9, width=size, height=size, denoising_strength=1.0)
        # a mask on a 4-channel model is refused, naming the field
        r = httpx.post(s.url + "/sdapi/v1/txt2img", json={"prompt": "x"}, timeout=30)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "init_images"]
    expected = pipe("a red square", negative_prompt="", init_image=photo, mask_image=mask, strength=1.0, seed=9,
                    steps=6, sampler="Euler", guidance_scale=7.0, progress=False)
    assert np.array_equal(_pixels(result.image), _pixels(expected.images[0]))
    assert result.info["is_using_inpainting_conditioning"] is True


def test_mask_needs_an_inpainting_model(server, demo):
    image = _b64_png(Image.new("RGB", (32, 32), "white"))
    r = httpx.post(server.url + "/sdapi/v1/img2img", json={"init_images": [image], "mask": image}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "mask"]


def test_sampler_and_scheduler_lists(server, demo):
    api = server.api()
    listed = api.get_samplers()
    names = [s["name"] for s in listed]
    assert names == [name for name, _, _ in SAMPLER_LABELS] and "Euler a" in names and "DPM++ 2M" in names
    assert names[:20] == list(A1111_SAMPLERS)  # A1111's list, in its order, then sdengine's DDPM
    assert listed[names.index("DPM2")]["options"] == {"scheduler": "karras", "discard_next_to_last_sigma": True,
                                                      "second_order": True}
    assert listed[names.index("Euler a")]["aliases"] == ["k_euler_a", "k_euler_ancestral"]
    for name in names:  # every listed sampler plans, under the rules its name picks, and the server takes it
        samplers.plan_for(name, None, 6, demo.config.scheduler)
        request = types.SimpleNamespace(sampler_name=name, sampler_index=None, scheduler=None)
        sampler, schedule, conventions = sampler_and_schedule(request, demo.config.scheduler)
        check_plan(sampler, schedule, 6, demo.config.scheduler, conventions)
    schedulers = api.get_schedulers()
    assert [(s["name"], s["label"]) for s in schedulers] == [(n, l) for n, l, *_ in A1111_SCHEDULE_TABLE]
    assert len(schedulers) == 12
    assert schedulers[2] == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                             "need_inner_model": False}
    assert schedulers[5]["aliases"] == ["SGMUniform"] and schedulers[5]["need_inner_model"] is True
    for item in schedulers:  # every listed schedule plans, by name, label or alias
        for spelling in [item["name"], item["label"], *(item["aliases"] or [])]:
            samplers.plan_for("Euler", None if spelling in ("automatic", "Automatic") else spelling, 6,
                              demo.config.scheduler)
    models = api.get_sd_models()
    assert models[0]["title"] == "demo-digits" and api.get_options()["sd_model_checkpoint"] == "demo-digits"
    r = httpx.post(server.url + "/sdapi/v1/txt2img",
                   json={"prompt": PROMPT, "steps": 4, "width": 32, "height": 32, "sampler_name": "DPM++ 2M",
                         "scheduler": "Karras"}, timeout=30)
    assert r.status_code == 200 and "Schedule type: Karras" in json.loads(r.json()["info"])["infotexts"][0]
    r = httpx.post(server.url + "/sdapi/v1/txt2img",
                   json={"prompt": PROMPT, "steps": 4, "width": 32, "height": 32, "sampler_name": "Restart",
                         "scheduler": "SGMUniform"}, timeout=30)  # an alias A1111 accepts
    infotext = json.loads(r.json()["info"])["infotexts"][0]
    assert r.status_code == 200 and "Sampler: Restart" in infotext and "Schedule type: SGM Uniform" in infotext


def test_interrupt_and_progress(server):
    api = server.api(sampler="Euler", steps=1000)
    outcome = {}

    def long_request():
        start = time.monotonic()
        outcome["result"] = api.txt2img(prompt=PROMPT, seed=1, width=32, height=32)
        outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.monotonic() + 60
    while True:  # wait until it is sampling
        progress = api.get_progress()
        if progress["state"]["sampling_step"] > 0:
            break
        assert time.monotonic() < deadline, progress
        time.sleep(0.05)
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 1000
    assert progress["eta_relative"] > 0
    assert api.interrupt() == {}  # A1111's answer
    thread.join(60)
    assert not thread.is_alive()
    result = outcome["result"]
    # A1111 answers an interrupted request with the image the latents hold so far.
    assert result.info["interrupted"] is True and len(result.images) == 1
    assert outcome["seconds"] < 8  # 1000 steps take over 10 s
    assert api.get_progress()["state"]["job_count"] == 0


def test_batched_requests_match_alone(server, demo):
    """Four same-shape requests arriving together run as one pipeline call; each image is the
    same request served alone, up to CPU rounding (see docs/serving.md, "Batching")."""
    bodies = [dict(prompt=f"a handwritten digit {w}", negative_prompt=n, seed=40 + i, steps=10, width=32, height=32,
                   sampler_name="Euler a", cfg_scale=7.0)
              for i, (w, n) in enumerate([("zero", ""), ("one", "blurry"), ("two", ""), ("three", "thick")])]

    def batch_histogram():
        text = httpx.get(server.url + "/metrics").text
        return {line.split('le="')[1].split('"')[0]: float(line.split()[-1])
                for line in text.splitlines() if line.startswith("sdengine_batch_images_bucket")}

    before = batch_histogram()
    with httpx.Client(timeout=60) as http:
        results = [None] * 4

        def post(i):
            results[i] = http.post(server.url + "/sdapi/v1/txt2img", json=bodies[i])

        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    after = batch_histogram()
    # one pipeline call of 4 images: the "<= 3" bucket did not move, the "<= 4" one did by one
    assert after["3.0"] - before["3.0"] == 0 and after["4.0"] - before["4.0"] == 1, (before, after)
    for body, response in zip(bodies, results):
        assert response.status_code == 200
        batched = _pixels(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))
        alone = _pixels(demo(body["prompt"], negative_prompt=body["negative_prompt"], seed=body["seed"], steps=10,
                             width=32, height=32, sampler="Euler a", guidance_scale=7.0, progress=False).images[0])
        diff = np.abs(batched.astype(int) - alone.astype(int))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.05, (diff.max(), (diff > 0).mean())
        assert json.loads(response.json()["info"])["all_seeds"] == [body["seed"]]


@pytest.mark.parametrize("body,field", [
    ({"width": 4096, "height": 4096}, "width"),                  # over the 2048^2 pixel cap
    ({"batch_size": 4, "n_iter": 5}, "n_iter"),                  # 20 images, over the cap of 16
    ({"batch_size": 17}, "batch_size"),
    ({"steps": 2.5}, "steps"), ({"width": 30}, "width"), ({"cfg_scale": "nan"}, "cfg_scale"),
    ({"sampler_name": "Nope"}, "sampler_name"), ({"scheduler": "nope"}, "scheduler"),
    ({"restore_faces": True}, "restore_faces"), ({"seed": -5}, "seed"),
    ({"override_settings": {"sd_model_checkpoint": "other-model"}}, "override_settings"),
])
def test_invalid_txt2img_is_422_naming_the_field(server, body, field):
    r = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 4, **body}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][:2] == ["body", field], r.json()


@pytest.mark.parametrize("init_images,field,words", [
    (["not base64 !!"], "init_images", "base64"),
    ([base64.b64encode(b"plain text, not an image").decode()], "init_images", "not an image"),
    (["data:image/png;base64,@@@"], "init_images", "base64"),
    ([], "init_images", "at least 1 item"),  # pydantic's words: the schema's minItems
])
def test_bad_init_images_are_422(server, init_images, field, words):
    r = httpx.post(server.url + "/sdapi/v1/img2img", json={"prompt": PROMPT, "init_images": init_images}, timeout=30)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"][:2] == ["body", field] and words in detail["msg"]


def test_50_mb_body_is_413_and_server_stays_up(server):
    big = {"prompt": PROMPT, "init_images": ["A" * (50 * 1024 * 1024)]}
    r = httpx.post(server.url + "/sdapi/v1/img2img", json=big, timeout=60)
    assert r.status_code == 413 and "bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: cut off at the cap while reading
        yield b'{"prompt": "x", "init_images": ["'
        for _ in range(50):
            yield b"A" * (1024 * 1024)
        yield b'"]}'

    r = httpx.post(server.url + "/sdapi/v1/img2img", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_metrics(server):
    httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 3, "width": 32, "height": 32},
               timeout=30)
    text = httpx.get(server.url + "/metrics").text
    for name in ("sdengine_queue_depth", "sdengine_requests_total", "sdengine_request_latency_seconds_bucket",
                 "sdengine_images_per_second", "sdengine_images_total", "sdengine_batch_images_bucket"):
        assert name in text, name
    ips = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("sdengine_images_per_second")))
    assert ips > 0


def test_queue_full_is_503_with_retry_after():
    with serve(max_queue=1, batching=False) as s:
        with httpx.Client(timeout=60) as http:
            results = []

            def post():
                results.append(http.post(s.url + "/sdapi/v1/txt2img",
                                         json={"prompt": PROMPT, "steps": 300, "width": 32, "height": 32}))

            threads = [threading.Thread(target=post) for _ in range(5)]
            for t in threads:
                t.start()
                time.sleep(0.05)
            s.app.state.engine.scheduler.interrupt()  # do not wait for all of them to finish
            for t in threads:
                t.join()
        statuses = sorted(r.status_code for r in results)
        assert 503 in statuses and 200 in statuses, statuses
        assert all(r.headers["retry-after"].isdigit() for r in results if r.status_code == 503)


def test_api_key_on_every_endpoint():
    with serve(api_key="s3cret") as s:
        for method, path in [("GET", "/health"), ("GET", "/metrics"), ("GET", "/sdapi/v1/samplers"),
                             ("GET", "/sdapi/v1/progress"), ("POST", "/sdapi/v1/interrupt"),
                             ("POST", "/sdapi/v1/txt2img"), ("GET", "/docs")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                r = httpx.request(method, s.url + path, headers=headers, json={} if method == "POST" else None)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.get(s.url + "/health", headers=good).status_code == 200
        r = httpx.post(s.url + "/sdapi/v1/txt2img", headers=good,
                       json={"prompt": PROMPT, "steps": 3, "width": 32, "height": 32}, timeout=30)
        assert r.status_code == 200
        api = s.api()
        api.session.headers["Authorization"] = "Bearer s3cret"  # how webuiapi users pass the key
        assert api.get_samplers()


def test_cli_without_the_extra_names_the_install_command(monkeypatch, capsys):
    from sdengine import cli

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    assert cli.main(["serve"]) == 2
    assert 'pip install "sdengine[serve]"' in capsys.readouterr().err


def test_cli_ray_without_ray(monkeypatch, capsys):
    from sdengine import cli

    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert cli.main(["serve", "--ray"]) == 2
    err = capsys.readouterr().err
    assert "Ray Serve" in err and 'pip install "sdengine[serve]"' in err


def test_cli_refuses_bad_settings(capsys):
    from sdengine import cli

    assert cli.main(["serve", "--max-queue", "0"]) == 2
    assert "--max-queue" in capsys.readouterr().err
    assert cli.main(["serve", "--replicas", "2"]) == 2
    assert "--ray" in capsys.readouterr().err


def test_exposed_host_warns(monkeypatch, capsys):
    from sdengine.serve import cli as serve_cli

    started = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: started.update(kw))
    monkeypatch.setattr(serve_cli, "build_local_app", lambda *a, **k: _FakeApp())
    from sdengine import cli

    assert cli.main(["serve", "--host", "0.0.0.0"]) == 0
    assert started["host"] == "0.0.0.0"
    err = capsys.readouterr().err
    assert "warning" in err and "0.0.0.0" in err and "--api-key" in err
    assert cli.main(["serve"]) == 0 and started["host"] == "127.0.0.1"  # the default: loopback only
    assert "warning" not in capsys.readouterr().err


class _FakeApp:
    class state:
        class engine:
            class _info:
                title = "fake"

            @staticmethod
            def close():
                pass


@pytest.mark.parametrize("fields,field,kwargs", [
    ({"width": 8200, "height": 8}, "width", {"width": 8200, "height": 8}),   # under --max-size, over MAX_SIDE
    ({"override_settings": {"CLIP_stop_at_last_layers": 5000}}, "override_settings", {"clip_skip": 4999}),
])
def test_requests_are_checked_by_the_shared_request_before_queueing(fields, field, kwargs):
    """make_spec refuses what sdengine.request refuses for generate() (the same words, under the
    A1111 field's name) before the request is queued: a bad request never reaches a batch of good ones."""
    from sdengine.config import SchedulerConfig
    from sdengine.request import Request
    from sdengine.serve.requests import FieldError, Limits, ModelInfo, make_spec
    from sdengine.serve.schemas import Txt2ImgRequest

    info = ModelInfo(title="m", filename="m", default_size=64, is_inpaint=False, scheduler_config=SchedulerConfig())
    with pytest.raises(FieldError) as caught:
        make_spec(Txt2ImgRequest(**{"prompt": PROMPT, "steps": 4, **fields}), info, Limits(max_size=16384),
                  img2img=False, prompt_syntax=None)
    assert caught.value.field.split(".")[0] == field
    with pytest.raises(ValueError) as direct:  # what generate() says of the same value
        Request.from_args(PROMPT, **kwargs)
    assert str(direct.value) in str(caught.value)


def test_webuiapi_hires_fix_equals_generate(server):
    """A1111's hires fields (enable_hr, hr_scale, hr_upscaler, hr_second_pass_steps, denoising_strength,
    hr_sampler_name) run sdengine's hires fix: the same pixels and infotext as generate()."""
    api = server.api(sampler="Euler", steps=6)
    result = api.txt2img(prompt=PROMPT, seed=21, width=32, height=32, cfg_scale=6.0, enable_hr=True, hr_scale=2,
                         hr_upscaler="Latent (bicubic)", hr_second_pass_steps=3, denoising_strength=0.55,
                         hr_sampler_name="Euler a")
    reference = sdengine.generate(PROMPT, seed=21, steps=6, sampler="Euler", guidance_scale=6.0, width=32, height=32,
                                  prompt_syntax="a1111", progress=False,
                                  hires=sdengine.Hires(scale=2, upscaler="Latent (bicubic)", steps=3,
                                                       denoising_strength=0.55, sampler="Euler a"))
    image = result.images[0]
    assert image.size == (64, 64)
    assert np.array_equal(_pixels(image), _pixels(reference.images[0]))
    assert image.info["parameters"] == reference.infotext(0)
    assert "Hires upscale: 2, Hires steps: 3, Hires upscaler: Latent (bicubic), Hires sampler: Euler a" \
        in image.info["parameters"]


def test_refiner_checkpoint_hands_over_to_the_loaded_refiner(tmp_path):
    from support.tiny import save_tiny_pipeline

    base = save_tiny_pipeline("sdxl", tmp_path / "base")
    refiner_folder = save_tiny_pipeline("sdxl-refiner", tmp_path / "sd_xl_refiner")
    body = {"prompt": "a red bicycle", "steps": 6, "seed": 3, "width": 16, "height": 16, "sampler_name": "Euler",
            "cfg_scale": 5.0, "refiner_checkpoint": "sd_xl_refiner [7440042bbd]", "refiner_switch_at": 0.6}
    with serve(str(base), refiner=str(refiner_folder)) as s:
        r = httpx.post(s.url + "/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        bad = httpx.post(s.url + "/sdapi/v1/txt2img", json=dict(body, refiner_checkpoint="other"), timeout=30)
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    want = sdengine.load(base)(body["prompt"], negative_prompt="", steps=6, seed=3, width=16, height=16, sampler="Euler",
                               guidance_scale=5.0, prompt_syntax="a1111", progress=False,
                               refiner=sdengine.load(refiner_folder), refiner_switch_at=0.6).images[0]
    assert np.array_equal(_pixels(got), _pixels(want))
    assert "Refiner: sd_xl_refiner, Refiner switch at: 0.6" in got.info["parameters"]
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][:2] == ["body", "refiner_checkpoint"]


@pytest.mark.parametrize("body,field", [
    ({"enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, "hr_upscaler"),
    ({"enable_hr": True, "hr_scale": 100}, "hr_scale"),
    ({"enable_hr": True, "hr_scale": 4, "width": 1024, "height": 1024}, "hr_scale"),  # over the pixel cap
    ({"enable_hr": True, "hr_sampler_name": "Nope"}, "hr_sampler_name"),
    ({"enable_hr": True, "denoising_strength": 0}, "denoising_strength"),
    ({"enable_hr": True, "hr_checkpoint_name": "other"}, "hr_checkpoint_name"),
    ({"refiner_checkpoint": "sd_xl_refiner_1.0"}, "refiner_checkpoint"),       # this server has none
])
def test_invalid_hires_and_refiner_fields_are_422(server, body, field):
    r = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 4, **body}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][:2] == ["body", field], r.json()


def test_ip_adapter_unit_in_alwayson_scripts(tmp_path):
    """A ControlNet unit with an IP-Adapter module, as webuiapi's ControlNetUnit sends it, runs the
    adapter the server loaded (--ip-adapter, --image-encoder): the pixels of pipe(ip_adapter_image=...)."""
    from support.ip_adapter_files import write_image_encoder, write_ip_adapter
    from support.tiny import save_tiny_pipeline

    model = save_tiny_pipeline("sd15", tmp_path / "model")
    encoder = write_image_encoder(tmp_path / "image_encoder")
    adapter = write_ip_adapter(tmp_path / "ip-adapter_sd15.safetensors", "sd15")
    prompt_image = Image.fromarray((np.random.default_rng(1).random((90, 70, 3)) * 255).astype("uint8"))
    unit = webuiapi.ControlNetUnit(image=prompt_image, module="ip-adapter_clip_sd15", model="ip-adapter_sd15 [abcd1234]",
                                   weight=0.7)
    with serve(str(model), ip_adapters=(str(adapter),), image_encoder=str(encoder)) as s:
        api = s.api(sampler="Euler", steps=3)
        # A fresh dict: webuiapi's txt2img writes the units into its mutable default alwayson_scripts={},
        # which every later txt2img call of the process (other tests' included) would send again.
        result = api.txt2img(prompt="a cat", seed=5, width=16, height=16, controlnet_units=[unit], alwayson_scripts={})
        bad = httpx.post(s.url + "/sdapi/v1/txt2img", timeout=30, json={
            "prompt": "a cat", "steps": 2, "alwayson_scripts": {"ControlNet": {"args": [
                dict(unit.to_dict(), model="ip-adapter_other")]}}})
    pipe = sdengine.load(model)
    pipe.load_ip_adapter(adapter, image_encoder=encoder)
    want = pipe("a cat", negative_prompt="", seed=5, steps=3, width=16, height=16, sampler="Euler", guidance_scale=7.0,
                prompt_syntax="a1111", progress=False, ip_adapter_image=prompt_image, ip_adapter_scale=0.7)
    assert np.array_equal(_pixels(result.images[0]), _pixels(want.images[0]))
    plain = pipe("a cat", negative_prompt="", seed=5, steps=3, width=16, height=16, sampler="Euler",
                 guidance_scale=7.0, prompt_syntax="a1111", progress=False).images[0]
    assert not np.array_equal(_pixels(result.images[0]), _pixels(plain))
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"][:6] == ["body", "alwayson_scripts", "ControlNet", "args", "0", "model"]


def _tiny_controlnet_server_files(tmp_path):
    """The tiny SD1 model and its tiny ControlNet (diffusers' from_unet, perturbed), saved as folders."""
    from support.tiny import save_tiny_pipeline, tiny_controlnet

    model = save_tiny_pipeline("sd15", tmp_path / "model")
    controlnet = tmp_path / "edges-controlnet"
    tiny_controlnet("sd15").save_pretrained(controlnet, safe_serialization=True)
    return model, controlnet


def test_controlnet_unit_in_alwayson_scripts(tmp_path):
    """`sdengine serve --controlnet`: /controlnet/model_list names it, and a webuiapi ControlNetUnit
    (module none: the image is the control map) runs it with its weight and guidance start / end:
    the pixels and infotext of pipe(control=[sdengine.Control(...)]). A bad model or module, an
    unknown resize mode, a mask and guidance_start after guidance_end are 422s naming the unit's field."""
    model, controlnet = _tiny_controlnet_server_files(tmp_path)
    control_image = Image.fromarray((np.random.default_rng(2).random((16, 16, 3)) * 255).astype("uint8"))
    # webuiapi's default resize mode, "Resize and Fill", on an image of the output size: as sent
    unit = webuiapi.ControlNetUnit(image=control_image, module="none", model="edges-controlnet [ffffffff]",
                                   weight=0.8, guidance_start=0.0, guidance_end=0.75)
    bad_units = {
        "model": dict(unit.to_dict(), model="control_v11p_sd15_canny"),
        "module": dict(unit.to_dict(), module="canny"),
        "resize_mode": unit.to_dict() | {"resize_mode": "Outpaint"},
        "mask": unit.to_dict() | {"mask": _b64_png(control_image)},
        "guidance_start": unit.to_dict() | {"guidance_start": 0.9, "guidance_end": 0.2},
        "control_mode": unit.to_dict() | {"control_mode": "My prompt is more important"},
    }
    with serve(str(model), controlnets=(str(controlnet),), max_steps=10) as s:
        api = s.api(sampler="Euler", steps=4)
        titles = api.controlnet_model_list()
        modules = api.controlnet_module_list()
        schema = httpx.get(s.url + "/openapi.json", timeout=120).json()
        # a fresh alwayson_scripts: webuiapi's default {} is shared by every call of the process
        result = api.txt2img(prompt="a cat", seed=5, width=16, height=16, controlnet_units=[unit], alwayson_scripts={})
        refused = {field: httpx.post(s.url + "/sdapi/v1/txt2img", timeout=30, json={
            "prompt": "a cat", "steps": 2, "width": 16, "height": 16,
            "alwayson_scripts": {"ControlNet": {"args": [{"enabled": False}, body]}}}) for field, body in bad_units.items()}
    pipe = sdengine.load(model)
    loaded = pipe.load_controlnet(controlnet)
    assert titles == [f"edges-controlnet [{loaded.shorthash}]"] and modules == ["none"]
    scripts = schema["components"]["schemas"]["Txt2ImgRequest"]["properties"]["alwayson_scripts"]["anyOf"][0]
    stated = [u for u in scripts["additionalProperties"]["properties"]["args"]["items"]["anyOf"]
              if "model" in u.get("properties", {})]
    assert [u["properties"]["model"]["examples"] for u in stated] == [["edges-controlnet"]]  # no IP-Adapter unit
    assert stated[0]["properties"]["resize_mode"]["enum"] == [None, "", 0, "Just Resize", 1, "Crop and Resize",
                                                              2, "Resize and Fill"]
    kwargs = dict(negative_prompt="", seed=5, steps=4, width=16, height=16, sampler="Euler", guidance_scale=7.0,
                  prompt_syntax="a1111", progress=False)
    want = pipe("a cat", control=[sdengine.Control(str(controlnet), control_image, scale=0.8, end=0.75)], **kwargs)
    assert np.array_equal(_pixels(result.images[0]), _pixels(want.images[0]))
    assert result.images[0].info["parameters"] == want.infotext(0)
    assert 'ControlNet 0: "Module: none, Model: edges-controlnet' in want.infotext(0)
    assert not np.array_equal(_pixels(result.images[0]), _pixels(pipe("a cat", **kwargs).images[0]))
    for field, r in refused.items():
        assert r.status_code == 422, (field, r.text)
        assert r.json()["detail"][0]["loc"] == ["body", "alwayson_scripts", "ControlNet", "args", "1", field], r.json()


def test_controlnet_and_ip_adapter_units_together(tmp_path):
    """An IP-Adapter unit and a ControlNet unit in one request run both: pipe(ip_adapter_image=...,
    control=...)'s pixels. model_list lists the ControlNet, then the IP-Adapter."""
    from support.ip_adapter_files import write_image_encoder, write_ip_adapter

    model, controlnet = _tiny_controlnet_server_files(tmp_path)
    encoder = write_image_encoder(tmp_path / "image_encoder")
    adapter = write_ip_adapter(tmp_path / "ip-adapter_sd15.safetensors", "sd15")
    rng = np.random.default_rng(3)
    prompt_image = Image.fromarray((rng.random((40, 30, 3)) * 255).astype("uint8"))
    control_image = Image.fromarray((rng.random((24, 20, 3)) * 255).astype("uint8"))  # resized to 16x16
    units = [webuiapi.ControlNetUnit(image=control_image, module="none", model="edges-controlnet", weight=1.2,
                                     guidance_start=0.25, resize_mode="Just Resize"),
             webuiapi.ControlNetUnit(image=prompt_image, module="ip-adapter_clip_sd15", model="ip-adapter_sd15",
                                     weight=0.7)]
    with serve(str(model), ip_adapters=(str(adapter),), image_encoder=str(encoder),
               controlnets=(str(controlnet),)) as s:
        api = s.api(sampler="Euler", steps=4)
        titles = api.controlnet_model_list()
        result = api.txt2img(prompt="a cat", seed=8, width=16, height=16, controlnet_units=units, alwayson_scripts={})
    pipe = sdengine.load(model)
    pipe.load_ip_adapter(adapter, image_encoder=encoder)
    assert titles[1:] == ["ip-adapter_sd15"] and titles[0].startswith("edges-controlnet [")
    want = pipe("a cat", negative_prompt="", seed=8, steps=4, width=16, height=16, sampler="Euler", guidance_scale=7.0,
                prompt_syntax="a1111", progress=False, ip_adapter_image=prompt_image, ip_adapter_scale=0.7,
                control=[sdengine.Control(str(controlnet), control_image, scale=1.2, start=0.25)])
    assert np.array_equal(_pixels(result.images[0]), _pixels(want.images[0]))
    assert result.images[0].info["parameters"] == want.infotext(0)


def test_serve_controlnet_flag_is_repeatable():
    import argparse

    from sdengine.serve.options import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_args(parser.parse_args(["model", "--controlnet", "canny/", "--controlnet", "depth.pth"]))
    assert settings.controlnets == ("canny/", "depth.pth")
    assert settings_from_args(parser.parse_args([])).controlnets == ()


def test_controlnet_resize_modes_fit_the_image_as_the_extension_does():
    """A 12x6 control image fitted to 8x8: Crop and Resize scales by the larger ratio (16x8) and
    keeps the centre; Resize and Fill scales by the smaller (8x4) and centres it on the median colour
    of the image's border; Just Resize leaves the stretch to the pipeline."""
    from sdengine.serve.requests import fit_control_image

    pixels = (np.random.default_rng(7).random((6, 12, 3)) * 255).astype("uint8")
    image = Image.fromarray(pixels)
    assert fit_control_image(image, 0, 8, 8) is image
    cropped = fit_control_image(image, 1, 8, 8)
    scaled = image.resize((16, 8), resample=Image.LANCZOS)
    assert cropped.size == (8, 8) and np.array_equal(_pixels(cropped), _pixels(scaled)[:, 4:12])
    filled = _pixels(fit_control_image(image, 2, 8, 8))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    colour = np.median(border, axis=0).astype("uint8")
    assert filled.shape == (8, 8, 3) and (filled[:2] == colour).all() and (filled[6:] == colour).all()
    assert np.array_equal(filled[2:6], _pixels(image.resize((8, 4), resample=Image.LANCZOS)))
    assert fit_control_image(image.resize((8, 8)), 2, 8, 8).size == (8, 8)
