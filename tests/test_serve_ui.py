"""The web UI of `sdengine serve` (issue 29), in a real browser: Playwright's Python API driving
Debian's Chromium (/usr/bin/chromium; `.ci/run` installs it) against the demo model on
127.0.0.1. Controls are found by their accessible names, as a screen reader finds them.

Screenshots go to a temporary folder ($SDENGINE_UI_SCREENSHOTS to choose it); the test log
names it.
"""

import base64
import io
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'sdengine[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install playwright")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from PIL.PngImagePlugin import PngInfo  # noqa: E402

import sdengine  # noqa: E402
from sdengine.serve.app import ServeSettings  # noqa: E402
from sdengine.serve.cli import build_local_app  # noqa: E402
from support.server import InProcessServer  # noqa: E402

CHROMIUM = os.environ.get("SDENGINE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# As the machine notes say: headless, no sandbox (CI runs as root), no calls to Google's hosts.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "a handwritten digit seven"
API_KEY = "s3cret-key"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    loras = tmp_path_factory.mktemp("loras")
    (loras / "ink.safetensors").write_bytes(b"listed by name; never loaded here")
    with InProcessServer(build_local_app(None, ServeSettings(max_size=512, lora_dir=str(loras)))) as srv:
        yield srv


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    folder = Path(os.environ.get("SDENGINE_UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"web UI screenshots: {folder}")
    return folder


class Page:
    """A page of the UI, with what the browser logged."""

    def __init__(self, browser, url: str, width: int = 1280, height: int = 800, ready: bool = True):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.console_errors = []
        self.requested = []  # every URL the page asked for: this server's, or data: URLs it made
        self.page.on("request", lambda r: self.requested.append(r.url))
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(f"uncaught: {e}"))
        self.page.goto(url)
        if ready:
            self.wait_ready()

    def wait_ready(self):
        """Generate is enabled once the page has the server's lists and schema."""
        sync_api.expect(self.generate_button).to_be_enabled(timeout=30_000)

    def field(self, name: str):
        return self.page.get_by_label(name, exact=True)

    @property
    def generate_button(self):
        return self.page.get_by_role("button", name="Generate", exact=True)

    def image(self, n: int):
        return self.page.get_by_alt_text(f"Generated image {n}", exact=True)

    def image_png(self, n: int) -> bytes:
        src = self.image(n).get_attribute("src")
        assert src.startswith("data:image/png;base64,"), src[:40]
        return base64.b64decode(src.split(",", 1)[1])

    def fill(self, **fields):
        for name, value in fields.items():
            control = self.field(name)
            if control.evaluate("e => e.tagName") == "SELECT":
                control.select_option(value)
            else:
                control.fill(str(value))

    def generate(self, n: int, timeout_ms: int = 60_000):
        """Press Generate; return the server's answer (its JSON) once image n is shown."""
        with self.page.expect_response(re.compile(r"/sdapi/v1/(txt2img|img2img)$"), timeout=timeout_ms) as answer:
            self.generate_button.click()
        self.image(n).wait_for(timeout=timeout_ms)
        return answer.value.json()

    def close(self):
        self.context.close()


@pytest.fixture
def page(browser, server):
    p = Page(browser, server.url + "/")
    yield p
    p.close()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_generate_shows_the_servers_png_equal_to_generate(page, server, screenshots):
    page.fill(**{"Prompt": PROMPT, "Negative prompt": "blurry", "Sampler": "Euler a", "Steps": 12, "CFG scale": 6.5,
                 "Width": 32, "Height": 32, "Seed": 1234, "Batch size": 2})
    answer = page.generate(2)
    shown = [page.image_png(1), page.image_png(2)]
    assert shown == [base64.b64decode(b) for b in answer["images"]], "the page's <img> is not the server's PNG"
    reference = sdengine.generate(PROMPT, negative_prompt="blurry", seed=1234, steps=12, sampler="Euler a",
                                  guidance_scale=6.5, width=32, height=32, batch_size=2, prompt_syntax="a1111",
                                  progress=False)
    for i, png in enumerate(shown):
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.info["parameters"] == reference.infotext(i)
        assert np.array_equal(_pixels(png), np.asarray(reference.images[i].convert("RGB"))), f"image {i + 1}"
    link = page.page.get_by_role("link", name="Download PNG").first
    assert link.get_attribute("download").endswith(".png")
    assert base64.b64decode(link.get_attribute("href").split(",", 1)[1]) in shown
    sync_api.expect(page.page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    page.page.screenshot(path=str(screenshots / "generated.png"))
    assert page.console_errors == []
    elsewhere = [u for u in page.requested if not u.startswith((server.url + "/", "data:"))]
    assert elsewhere == [], "the page asked another host"


def test_hires_fix_from_the_form_equals_generate(page):
    """The hires fix's fields (txt2img only): the server's PNG is sdengine.generate's with the same
    sdengine.Hires, at the second pass's size. The refiner's, IP-Adapters' and ControlNet's sections
    stay hidden on a server that loaded none."""
    page.fill(**{"Prompt": PROMPT, "Steps": 6, "Width": 32, "Height": 32, "Seed": 7, "Sampler": "Euler"})
    page.page.locator("#hires").evaluate("d => { d.open = true; }")
    page.field("Hires fix").check()
    page.fill(**{"Upscaler": "Latent (bicubic)", "Upscale by": 1.5, "Hires steps": 3, "Hires denoising": 0.55})
    answer = page.generate(1)
    png = base64.b64decode(answer["images"][0])
    reference = sdengine.generate(PROMPT, seed=7, steps=6, sampler="Euler", guidance_scale=7.0, width=32, height=32,
                                  prompt_syntax="a1111", progress=False,
                                  hires=sdengine.Hires(scale=1.5, upscaler="Latent (bicubic)", steps=3,
                                                       denoising_strength=0.55))
    assert Image.open(io.BytesIO(png)).size == (48, 48)
    assert Image.open(io.BytesIO(png)).info["parameters"] == reference.infotext(0)
    assert np.array_equal(_pixels(png), np.asarray(reference.images[0].convert("RGB")))
    for section in ("#refiner", "#ip-adapters", "#controlnet"):  # none loaded
        assert page.page.locator(section).is_hidden(), section
    assert page.console_errors == []


def test_ctrl_enter_generates(page):
    page.fill(**{"Prompt": PROMPT, "Steps": 4, "Seed": 5})
    page.field("Prompt").press("Control+Enter")
    page.image(1).wait_for(timeout=60_000)
    assert page.console_errors == []


def test_preview_appears_before_the_image_and_interrupt_stops_a_200_step_run(page, screenshots):
    """256x256 on the demo model: 200 steps take tens of seconds here; the preview (the latents'
    cheap RGB, every step) is shown and changes while it runs; Interrupt ends it in seconds."""
    page.fill(**{"Prompt": PROMPT, "Steps": 200, "Width": 256, "Height": 256, "Seed": 3})
    preview = page.page.get_by_alt_text("Live preview", exact=True)
    page.generate_button.click()
    preview.wait_for(timeout=60_000)
    previews = {preview.get_attribute("src")}
    deadline = time.monotonic() + 30
    while len(previews) < 3:
        assert time.monotonic() < deadline, "the preview does not change"
        assert page.image(1).count() == 0, "the final image came before three previews"
        previews.add(preview.get_attribute("src"))
        page.page.wait_for_timeout(100)
    step = int(re.search(r"Step (\d+)/200", page.page.locator("#status").text_content()).group(1))
    assert step < 150, f"the run was nearly over ({step}/200) before the test could interrupt it"
    page.page.screenshot(path=str(screenshots / "preview.png"))
    pressed = time.monotonic()
    page.page.get_by_role("button", name="Interrupt", exact=True).click()
    page.image(1).wait_for(timeout=10_000)
    stopped_after = time.monotonic() - pressed
    assert stopped_after < 3.0, f"Interrupt took {stopped_after:.1f} s"
    sync_api.expect(page.page.locator("#status")).to_contain_text("Interrupted")
    assert preview.is_hidden()
    assert page.console_errors == []


def test_queue_position_while_waiting(page, server):
    """A request behind another says how many are ahead of it (POST /internal/progress), then runs."""
    import threading

    ahead = threading.Thread(target=lambda: httpx.post(server.url + "/sdapi/v1/txt2img", timeout=120, json={
        "prompt": PROMPT, "steps": 200, "width": 256, "height": 256, "seed": 1}))
    ahead.start()
    try:
        deadline = time.monotonic() + 60
        while not httpx.get(server.url + "/sdapi/v1/progress?skip_current_image=true").json()["state"]["job_count"]:
            assert time.monotonic() < deadline, "the first request did not start"
            time.sleep(0.05)
        page.fill(**{"Prompt": PROMPT, "Steps": 4, "Width": 32, "Height": 32})  # another shape: its own batch
        page.generate_button.click()
        sync_api.expect(page.page.locator("#status")).to_have_text("In queue: 1 request ahead", timeout=30_000)
    finally:
        httpx.post(server.url + "/sdapi/v1/interrupt")
        ahead.join(60)
    page.image(1).wait_for(timeout=60_000)
    assert page.console_errors == []


def test_bad_size_shows_the_servers_message_beside_the_size_field(page, server, screenshots):
    page.fill(**{"Prompt": PROMPT, "Steps": 4, "Width": 100})
    page.generate_button.click()
    message = page.page.locator(".field[data-field=width] .field-error")
    message.wait_for(timeout=30_000)
    server_says = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 4, "width": 100},
                             timeout=30).json()["detail"][0]["msg"]
    assert message.text_content() == server_says and "multiple of 8" in server_says
    width = page.field("Width")
    assert width.get_attribute("aria-invalid") == "true"
    assert width.get_attribute("aria-describedby") == message.get_attribute("id")
    page.fill(Width=1024)  # over --max-size 512: the server's own check
    page.generate_button.click()
    sync_api.expect(message).to_contain_text("over this server's cap of 512 (--max-size)")
    page.page.screenshot(path=str(screenshots / "field-error.png"))
    # the browser logs each refused fetch; nothing else may be logged
    assert all("status of 422" in e for e in page.console_errors), page.console_errors


def test_reuse_settings_then_generate_gives_the_same_image(page):
    page.fill(**{"Prompt": PROMPT, "Sampler": "DPM++ 2M", "Schedule": "karras", "Steps": 9, "CFG scale": 5,
                 "Seed": -1})
    first = page.generate(1)
    seed = str(__import__("json").loads(first["info"])["seed"])
    page.fill(**{"Prompt": "something else", "Steps": 3, "Seed": 1, "Sampler": "Euler", "Schedule": "automatic"})
    page.page.locator("figure", has=page.image(1)).get_by_role("button", name="Reuse settings").click()
    sync_api.expect(page.field("Seed")).to_have_value(seed)
    assert page.field("Prompt").input_value() == PROMPT
    assert page.field("Sampler").input_value() == "DPM++ 2M" and page.field("Schedule").input_value() == "karras"
    page.generate(2)
    assert page.image_png(2) == page.image_png(1)
    assert page.console_errors == []


def _a1111_png(text: str) -> bytes:
    meta = PngInfo()
    meta.add_text("parameters", text)
    buf = io.BytesIO()
    Image.new("RGB", (40, 48), (120, 30, 200)).save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def test_dropped_a1111_png_fills_the_form(page):
    infotext = ("a (red:1.2) fox, [forest]\nNegative prompt: blurry, lowres\nSteps: 23, Sampler: DPM++ 2M, "
                "Schedule type: Karras, CFG scale: 5.5, Seed: 4242, Size: 40x48, Model hash: 6ce0161689, "
                "Model: v1-5-pruned-emaonly, Version: v1.10.1")
    png = base64.b64encode(_a1111_png(infotext)).decode()
    transfer = page.page.evaluate_handle("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "00012-4242.png", { type: "image/png" }));
        return transfer;
    }""", png)
    page.page.dispatch_event("body", "dragenter", {"dataTransfer": transfer})
    page.page.dispatch_event("body", "drop", {"dataTransfer": transfer})
    sync_api.expect(page.field("Seed")).to_have_value("4242")
    assert page.field("Prompt").input_value() == "a (red:1.2) fox, [forest]"
    assert page.field("Negative prompt").input_value() == "blurry, lowres"
    values = {name: page.field(name).input_value() for name in ("Steps", "CFG scale", "Width", "Height",
                                                                "Sampler", "Schedule")}
    assert values == {"Steps": "23", "CFG scale": "5.5", "Width": "40", "Height": "48", "Sampler": "DPM++ 2M",
                      "Schedule": "karras"}
    assert page.page.locator("#drop-overlay").is_hidden()
    assert page.console_errors == []


def test_lora_button_inserts_its_tag(page):
    page.fill(Prompt=PROMPT)
    page.page.get_by_role("button", name="ink", exact=True).click()
    assert page.field("Prompt").input_value() == PROMPT + " <lora:ink:1>"


def test_img2img_and_mask(page, tmp_path):
    init = Image.new("RGB", (32, 32), (200, 200, 200))
    init.paste((20, 20, 20), (8, 4, 24, 28))
    init.save(tmp_path / "init.png")
    page.page.get_by_role("radio", name="img2img").check()
    page.page.get_by_label("Init image", exact=True).set_input_files(str(tmp_path / "init.png"))
    page.fill(**{"Prompt": PROMPT, "Steps": 10, "Seed": 8, "Sampler": "Euler", "Width": 32, "Height": 32})
    answer = page.generate(1)
    reference = sdengine.generate(PROMPT, init_image=init, strength=0.75, seed=8, steps=10, sampler="Euler",
                                  guidance_scale=7.0, width=32, height=32, progress=False)
    assert np.array_equal(_pixels(page.image_png(1)), np.asarray(reference.images[0].convert("RGB")))
    assert base64.b64decode(answer["images"][0]) == page.image_png(1)
    # a painted mask goes to the server, which says the demo model cannot inpaint, beside the mask
    box = page.page.get_by_label("Mask: drag to paint").bounding_box()
    page.page.mouse.move(box["x"] + 5, box["y"] + 5)
    page.page.mouse.down()
    page.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.page.mouse.up()
    page.generate_button.click()
    sync_api.expect(page.page.locator(".field[data-field=mask] .field-error")).to_contain_text("inpainting model")
    assert all("status of 422" in e for e in page.console_errors), page.console_errors


def test_busy_is_retried_and_a_lost_connection_is_shown(page):
    """503 (a full queue) is retried after Retry-After, saying so; a connection that fails is
    reported, never a silent hang."""
    busy = {"left": 1}

    def once_busy(route):
        if busy["left"]:
            busy["left"] -= 1
            route.fulfill(status=503, headers={"Retry-After": "1", "Content-Type": "application/json"},
                          body='{"detail": "the queue is full; retry after 1 s"}')
        else:
            route.continue_()

    page.page.route("**/sdapi/v1/txt2img", once_busy)
    page.fill(**{"Prompt": PROMPT, "Steps": 4})
    page.generate_button.click()
    sync_api.expect(page.page.locator("#status")).to_contain_text("busy, retrying", timeout=10_000)
    page.image(1).wait_for(timeout=60_000)
    page.page.unroute("**/sdapi/v1/txt2img")
    page.page.route(re.compile(r"/(sdapi|internal)/"), lambda route: route.abort("connectionrefused"))
    page.generate_button.click()
    sync_api.expect(page.page.locator("#form-error")).to_contain_text("connection to the server was lost")
    sync_api.expect(page.page.locator("#connection")).to_have_text("Connection lost")
    assert all("503" in e or "ERR_CONNECTION_REFUSED" in e for e in page.console_errors), page.console_errors


def test_phone_sized_viewport(browser, server, screenshots):
    phone = Page(browser, server.url + "/", width=390, height=844)
    try:
        overflow = phone.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow} px wider than a phone's screen"
        for name in ("Prompt", "Negative prompt", "Sampler", "Schedule", "Steps", "CFG scale", "Width", "Height",
                     "Seed", "Batch size"):
            assert phone.field(name).count() == 1, name
        phone.fill(**{"Prompt": PROMPT, "Steps": 4, "Seed": 2})
        phone.generate(1)
        phone.image(1).scroll_into_view_if_needed()
        phone.page.screenshot(path=str(screenshots / "phone.png"), full_page=True)
        assert phone.console_errors == []
    finally:
        phone.close()


def test_api_key_is_asked_once_and_kept(browser, tmp_path):
    with InProcessServer(build_local_app(None, ServeSettings(api_key=API_KEY))) as srv:
        assert httpx.get(srv.url + "/sdapi/v1/samplers").status_code == 401
        keyed = Page(browser, srv.url + "/", ready=False)  # it cannot get ready before the key is given
        try:
            key = keyed.page.get_by_label("API key", exact=True)
            key.fill("wrong")
            keyed.page.get_by_role("button", name="Use key").click()
            sync_api.expect(keyed.page.locator("#key-error")).to_have_text("That key was refused.")
            key.fill(API_KEY)
            keyed.page.get_by_role("button", name="Use key").click()
            keyed.wait_ready()
            keyed.fill(**{"Prompt": PROMPT, "Steps": 4})
            keyed.generate(1)
            assert keyed.page.locator("dialog[open]").count() == 0, "the key was asked for again"
            keyed.page.reload()  # kept for the browser session
            keyed.wait_ready()
            assert keyed.page.locator("dialog[open]").count() == 0
            assert all("status of 401" in e for e in keyed.console_errors), keyed.console_errors
        finally:
            keyed.close()


def test_controlnet_panel_sends_a_unit_equal_to_generate(browser, tmp_path):
    """With `--controlnet`, the ControlNet panel lists it (/controlnet/model_list); a control image
    uploaded there, with its weight and end, gives the PNG of pipe(control=[sdengine.Control(...)])."""
    from support.tiny import save_tiny_pipeline, tiny_controlnet

    model = save_tiny_pipeline("sd15", tmp_path / "model")
    controlnet = tmp_path / "edges-controlnet"
    tiny_controlnet("sd15").save_pretrained(controlnet, safe_serialization=True)
    control_image = Image.fromarray((np.random.default_rng(4).random((16, 16, 3)) * 255).astype("uint8"))
    control_image.save(tmp_path / "control.png")
    settings = ServeSettings(max_size=64, max_steps=10, controlnets=(str(controlnet),))  # a quick schema
    with InProcessServer(build_local_app(str(model), settings)) as srv:
        page = Page(browser, srv.url + "/")
        try:
            sync_api.expect(page.page.locator("#controlnet")).to_be_visible()
            page.page.locator("#controlnet").evaluate("d => { d.open = true; }")
            options = page.field("ControlNet model").locator("option").all_text_contents()
            assert len(options) == 1 and options[0].startswith("edges-controlnet ["), options
            page.field("Control image").set_input_files(str(tmp_path / "control.png"))
            page.fill(**{"Prompt": "a cat", "Steps": 4, "Width": 16, "Height": 16, "Seed": 6, "Sampler": "Euler",
                         "Control weight": 0.8, "Control end": 0.75})
            answer = page.generate(1)
            png = page.image_png(1)
            assert base64.b64decode(answer["images"][0]) == png
            # Reuse settings reads the unit back from the infotext (the control image stays the uploaded one)
            page.fill(**{"Control weight": 1.5, "Control end": 1, "Seed": 1})
            page.page.locator("figure", has=page.image(1)).get_by_role("button", name="Reuse settings").click()
            sync_api.expect(page.field("Seed")).to_have_value("6")
            assert page.field("Control weight").input_value() == "0.8"
            assert page.field("Control end").input_value() == "0.75"
            page.generate(2)
            assert page.image_png(2) == png
            assert page.console_errors == []
        finally:
            page.close()
    pipe = sdengine.load(model)
    want = pipe("a cat", negative_prompt="", seed=6, steps=4, width=16, height=16, sampler="Euler", guidance_scale=7.0,
                prompt_syntax="a1111", progress=False,
                control=[sdengine.Control(str(controlnet), control_image, scale=0.8, end=0.75)])
    assert Image.open(io.BytesIO(png)).info["parameters"] == want.infotext(0)
    assert np.array_equal(_pixels(png), np.asarray(want.images[0].convert("RGB")))
