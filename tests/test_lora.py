"""LoRA: kohya / A1111 and diffusers / PEFT files merged in place, against diffusers'
load_lora_weights + fuse_lora on the same tiny random weights; bit-exact restore; hot swap under
the fused step's (stand-in) graph capture; bad input that changes nothing.

The LoRA files are made by tests/support/lora_files.py in the real key layouts (kohya names from the
reference networks' module tree, PEFT files by peft and diffusers themselves).
"""

import copy
import threading

import pytest
import torch

import sdengine
from sdengine import lora as lora_module
from sdengine.config import tiny_config
from sdengine.errors import ModelLoadError
from support.compare import max_diff
from support.lora_files import kohya_lora, kohya_state_dict, peft_lora
from support.tiny import tiny_pipeline

PROMPT = "a photo of an astronaut riding a horse"
TOL = 1 / 255
H = W = 32


def _latents(kind, n=1, seed=7):
    cfg = tiny_config(kind)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.vae.latent_channels, H // cfg.vae.downscale, W // cfg.vae.downscale, generator=g)


def _ours(kind, backend="eager"):
    """An sdengine pipeline on a private copy of the cached tiny weights (a LoRA changes them)."""
    return sdengine.from_diffusers(copy.deepcopy(tiny_pipeline(kind)), backend=backend)


def _diffusers_fused(kind, loras):
    """diffusers with each (path, scale) fused in turn: load_lora_weights, fuse_lora, unload (keeps the fused weights)."""
    pipe = copy.deepcopy(tiny_pipeline(kind))
    pipe.set_progress_bar_config(disable=True)
    for path, scale in loras:
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
    return pipe


def _images(pipe, kind, ours=True, **kwargs):
    args = dict(height=H, width=W, latents=_latents(kind), output_type="np")
    if ours:
        return pipe(PROMPT, steps=4, progress=False, **args, **kwargs).images
    return pipe(PROMPT, num_inference_steps=4, **args, **kwargs).images


def _state(pipe) -> dict:
    """Every tensor of the UNet and text encoder(s), copied."""
    b = pipe.backend
    return {f"{name}/{k}": v.clone() for name in ("unet", "text_encoder", "text_encoder_2")
            if getattr(b, name, None) is not None for k, v in getattr(b, name).state_dict().items()}


def _assert_bit_exact(pipe, before: dict):
    after = _state(pipe)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{len(changed)} tensors differ, e.g. {changed[:3]}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    sd15, sdxl = tiny_pipeline("sd15"), tiny_pipeline("sdxl")
    return {
        "kohya": kohya_lora(sd15, folder / "kohya.safetensors", rank=4, alpha=2.0, locon=True),
        "kohya_ldm": kohya_lora(sd15, folder / "kohya_ldm.safetensors", rank=4, alpha=2.0, locon=True, ldm_unet=True),
        "kohya_pt": kohya_lora(sd15, folder / "kohya_pt.pt", rank=4, alpha=2.0, locon=True),
        "peft": peft_lora(sd15, folder / "peft", rank=4, alpha=8.0),
        "diffusers": peft_lora(sd15, folder / "diffusers", rank=3, alpha=6.0, seed=5, diffusers_format=True),
        # diffusers maps the LDM name of an upsampler that follows no attention (output_blocks.1.1.conv)
        # to up_blocks.0.attentions.1 and drops it; the parity file leaves upsamplers out.
        "sdxl": kohya_lora(sdxl, folder / "sdxl.safetensors", rank=4, alpha=4.0, locon=True, seed=3,
                           skip=("upsamplers",)),
        "other": kohya_lora(sd15, folder / "other.safetensors", rank=8, alpha=None, locon=False, seed=9),
        "folder": folder,
    }


# ---------------------------------------------------------------------------
# Parity with diffusers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_kohya_sd1_with_alpha_and_locon_matches_diffusers_fuse_lora(files, scale):
    ours = _ours("sd15")
    base = _images(ours, "sd15")
    ours.set_loras([(files["kohya"], scale)])
    got = _images(ours, "sd15")
    ref = _images(_diffusers_fused("sd15", [(files["kohya"], scale)]), "sd15", ours=False)
    assert max_diff(got, ref) <= TOL
    assert max_diff(got, base) > 20 * TOL  # the LoRA shows


def test_two_loras_at_once_match_diffusers(files):
    loras = [(files["kohya"], 0.7), (files["peft"], 0.4)]
    ours = _ours("sd15")
    ours.set_loras(loras)
    got = _images(ours, "sd15")
    ref = _images(_diffusers_fused("sd15", loras), "sd15", ours=False)
    assert max_diff(got, ref) <= TOL
    one = _images(_diffusers_fused("sd15", loras[:1]), "sd15", ours=False)
    assert max_diff(got, one) > 10 * TOL  # the second LoRA shows


@pytest.mark.parametrize("layout", ["peft", "diffusers"])
def test_peft_and_diffusers_formats_match_diffusers(files, layout):
    ours = _ours("sd15")
    ours.set_loras([(files[layout], 0.8)])
    got = _images(ours, "sd15")
    ref = _images(_diffusers_fused("sd15", [(files[layout], 0.8)]), "sd15", ours=False)
    assert max_diff(got, ref) <= TOL
    assert max_diff(got, _images(_ours("sd15"), "sd15")) > 10 * TOL


@pytest.mark.slow
def test_kohya_sdxl_te1_te2_ldm_unet_matches_diffusers(files):
    ours = _ours("sdxl")
    ours.set_loras([(files["sdxl"], 0.9)])
    assert {layer.component for layer in ours._loras.loras[0][1].layers} == {"unet", "text_encoder", "text_encoder_2"}
    got = _images(ours, "sdxl", guidance_scale=5.0)
    ref = _images(_diffusers_fused("sdxl", [(files["sdxl"], 0.9)]), "sdxl", ours=False, guidance_scale=5.0)
    assert max_diff(got, ref) <= TOL
    assert max_diff(got, _images(_ours("sdxl"), "sdxl", guidance_scale=5.0)) > 10 * TOL


def test_ldm_names_torch_files_and_fp16_give_the_same_weights(files, tmp_path):
    """The LDM-named file (upsamplers, skip connections, emb_layers...) and the .pt hold the same
    tensors as the diffusers-named file: the merged weights are identical."""
    reference = _ours("sd15")
    reference.set_loras([files["kohya"]])
    expected = _state(reference)
    for name in ("kohya_ldm", "kohya_pt"):
        pipe = _ours("sd15")
        pipe.set_loras([files[name]])
        _assert_bit_exact(pipe, expected)
    names = set(kohya_state_dict(tiny_pipeline("sd15"), ldm_unet=True))
    assert any("output_blocks" in n and "_conv.lora_down" in n for n in names)  # an upsampler, LDM-named
    assert any("_emb_layers_1." in n for n in names) and any("_skip_connection." in n for n in names)
    # fp16 factors: the same update up to fp16 rounding of the factors
    from safetensors.torch import save_file

    state = kohya_state_dict(tiny_pipeline("sd15"), dtype=torch.float16)
    save_file(state, str(tmp_path / "half.safetensors"))
    pipe = _ours("sd15")
    pipe.set_loras([tmp_path / "half.safetensors"])
    got = _state(pipe)
    assert max(float((got[k] - expected[k]).abs().max()) for k in expected) < 2e-3


def test_alpha_defaults_and_scales(files):
    """No alpha: scale 1 (kohya's alpha = rank); PEFT: lora_alpha / r from the header."""
    cfg = tiny_config("sd15")
    other = lora_module.read_lora(files["other"], cfg)
    assert {layer.scale for layer in other.layers} == {1.0}
    kohya = lora_module.read_lora(files["kohya"], cfg)
    assert {layer.scale for layer in kohya.layers} == {0.5}  # alpha 2 / rank 4
    peft = lora_module.read_lora(files["peft"], cfg)
    assert {layer.scale for layer in peft.layers} == {2.0} and peft.layout == "peft"  # 8 / 4
    assert {layer.component for layer in peft.layers} == {"unet", "text_encoder"}


# ---------------------------------------------------------------------------
# Restore, swap, hot swap under graphs
# ---------------------------------------------------------------------------

def test_set_loras_empty_restores_every_weight_bit_exactly(files):
    pipe = _ours("sd15")
    before = _state(pipe)
    pipe.set_loras([(files["kohya"], 0.8), (files["peft"], 1.3)])
    assert not torch.equal(pipe.backend.unet.state_dict()["down_blocks.0.resnets.0.conv1.weight"],
                           before["unet/down_blocks.0.resnets.0.conv1.weight"])
    pipe.set_loras([(files["other"], 1.0)])  # a swap: the weights the first set touched come back too
    only_other = _ours("sd15")
    only_other.set_loras([(files["other"], 1.0)])
    _assert_bit_exact(pipe, _state(only_other))
    pipe.set_loras([])
    _assert_bit_exact(pipe, before)
    assert not pipe._loras._changed and pipe._loras._backups  # base values kept for the next swap


def test_triton_fused_qkv_views_and_restore(files):
    """The Triton backend fuses q, k, v into to_qkv at load: the LoRA of to_q lands in its rows."""
    pytest.importorskip("triton")
    eager, fast = _ours("sd15"), _ours("sd15", backend="triton")
    attn = fast.backend.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.to_qkv is not None and not hasattr(attn, "to_q")
    qkv_before = attn.to_qkv.weight.detach().clone()
    before = _state(fast)
    ptr = attn.to_qkv.weight.data_ptr()
    for pipe in (eager, fast):
        pipe.set_loras([(files["kohya"], 0.9)])
    e_attn = eager.backend.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    expected = torch.cat([e_attn.to_q.weight, e_attn.to_k.weight, e_attn.to_v.weight])
    assert attn.to_qkv.weight.data_ptr() == ptr  # the same storage, changed in place
    torch.testing.assert_close(attn.to_qkv.weight, expected, rtol=0, atol=1e-6)
    assert not torch.equal(attn.to_qkv.weight, qkv_before)
    fast.set_loras([])
    _assert_bit_exact(fast, before)


def test_hot_swap_keeps_the_captured_step_and_engine_keys(files, monkeypatch):
    """The fused step under the stand-in graph cache: swapping LoRAs captures nothing new, and the
    replayed step computes with the new weights (it equals eager with the same LoRA)."""
    pytest.importorskip("triton")
    from test_fused_step import StandInGraphs, _fast_step_pipeline

    from sdengine.export import aoti

    fast = _fast_step_pipeline("sd15")
    fast.backend.unet.load_state_dict(copy.deepcopy(fast.backend.unet.state_dict()))  # own the weights
    for name in ("text_encoder", "vae"):
        module = getattr(fast.backend, name)
        module.load_state_dict(copy.deepcopy(module.state_dict()))
    graphs = StandInGraphs()
    monkeypatch.setattr(fast.backend, "graphs", graphs)
    key = aoti.engine_key(fast.config, dtype=torch.float32, device=torch.device("cpu"))
    eager = _ours("sd15")
    run = dict(sampler="euler", guidance_scale=5.0)
    outputs = []
    captures = []
    for loras in ([], [(files["kohya"], 0.8)], [(files["peft"], 1.0), (files["other"], 0.5)], []):
        fast.set_loras(loras)
        eager.set_loras(loras)
        got = _images(fast, "sd15", **run)
        assert max_diff(got, _images(eager, "sd15", **run)) <= TOL
        outputs.append(got)
        captures.append(graphs.captures)
    # the whole step, the text encoder and the VAE decoder: captured once, replayed across every swap
    assert captures == [3, 3, 3, 3] and len(graphs.entries) == 3
    assert {k[0] for k in graphs.entries} == {"step", "text_encoder(clip_skip=None)", "vae_decode"}
    assert aoti.engine_key(fast.config, dtype=torch.float32, device=torch.device("cpu")) == key
    assert max_diff(outputs[0], outputs[1]) > 10 * TOL and max_diff(outputs[1], outputs[2]) > 10 * TOL
    assert max_diff(outputs[0], outputs[3]) == 0.0


def test_requests_during_swaps_see_whole_sets(files):
    """Calls on 3 threads while a 4th swaps: every image equals the serial image of the set its
    call ran with (never a half-applied set)."""
    pipe = _ours("sd15")
    sets = {(): [], ("kohya",): [(files["kohya"], 0.8)], ("peft",): [(files["peft"], 1.0)]}
    serial = {}
    for name, loras in sets.items():
        pipe.set_loras(loras)
        serial[name] = _images(pipe, "sd15", guidance_scale=1.0)
    by_path = {str(files["kohya"]): "kohya", str(files["peft"]): "peft"}
    errors, done = [], []

    def generate():
        try:
            for _ in range(4):
                result = pipe(PROMPT, steps=4, height=H, width=W, latents=_latents("sd15"), output_type="np",
                              progress=False, guidance_scale=1.0)
                name = tuple(by_path[lora["path"]] for lora in result.params["loras"])
                done.append(name)
                assert max_diff(result.images, serial[name]) == 0.0, name
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    def swap():
        for i in range(12):
            pipe.set_loras(list(sets.values())[i % 3])

    threads = [threading.Thread(target=generate) for _ in range(3)] + [threading.Thread(target=swap)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(done) == 12


def test_load_merges_loras(files, tmp_path):
    from support.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline("sd15", tmp_path / "model")
    loaded = sdengine.load(folder, device="cpu", loras=[(files["kohya"], 0.8)])
    expected = _ours("sd15")
    expected.set_loras([(files["kohya"], 0.8)])
    _assert_bit_exact(loaded, _state(expected))


# ---------------------------------------------------------------------------
# Bad input changes nothing
# ---------------------------------------------------------------------------

def _write(state, path):
    from safetensors.torch import save_file

    save_file(state, str(path))
    return path


def test_bad_files_are_errors_naming_file_and_key_and_change_nothing(files, tmp_path):
    pipe = _ours("sd15")
    pipe.set_loras([(files["kohya"], 0.6)])  # a set is merged: a failed swap must keep it
    before = _state(pipe)
    good = kohya_state_dict(tiny_pipeline("sd15"))
    keys = sorted(k for k in good if k.endswith("lora_down.weight"))

    tenth = dict(good)
    tenth[keys[9]] = torch.randn(4, tenth[keys[9]].shape[1] + 1, *tenth[keys[9]].shape[2:])
    ranks = dict(good)
    ranks[keys[3]] = torch.randn(5, *ranks[keys[3]].shape[1:])
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(files["kohya"].read_bytes()[:-100])
    unknown = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    cases = {
        "sdxl_on_sd1": (files["sdxl"], "lora_te1_"),
        "tenth_layer_shape": (_write(tenth, tmp_path / "tenth.safetensors"), keys[9].split(".")[0]),
        "mismatched_ranks": (_write(ranks, tmp_path / "ranks.safetensors"), keys[3].split(".")[0]),
        "truncated": (truncated, "truncated"),
        "unknown_layout": (_write(unknown, tmp_path / "unknown.safetensors"), "model.diffusion_model.input_blocks"),
        "no_up": (_write({keys[0]: good[keys[0]]}, tmp_path / "noup.safetensors"), keys[0].split(".")[0]),
    }
    for name, (path, named) in cases.items():
        with pytest.raises(ModelLoadError) as error:
            pipe.set_loras([(files["peft"], 1.0), (path, 1.0)])
        assert str(path) in str(error.value) and named in str(error.value), (name, str(error.value))
        _assert_bit_exact(pipe, before)
    with pytest.raises(FileNotFoundError):
        pipe.set_loras([tmp_path / "missing.safetensors"])
    with pytest.raises(ValueError, match="path"):
        pipe.set_loras([("a.safetensors", "strong")])
    _assert_bit_exact(pipe, before)
    assert [spec.path for spec, _ in pipe._loras.loras] == [files["kohya"]]


def test_lora_names_cover_every_target_once():
    """Each Linear / Conv2d weight has one kohya name per layout and one PEFT path, and no name is shared."""
    for kind in ("sd15", "sd21-v", "sdxl"):
        cfg = tiny_config(kind)
        names, targets = lora_module.lora_names(cfg), lora_module.lora_targets(cfg)
        covered = {}
        for name, target in names.items():
            covered.setdefault(target, []).append(name)
        assert set(covered) == set(targets)
        assert all(any(n.startswith("lora_") for n in ns) for ns in covered.values())
    sdxl = lora_module.lora_names(tiny_config("sdxl"))
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in sdxl
    assert "lora_unet_input_blocks_1_0_in_layers_2" in sdxl and "lora_unet_down_blocks_0_resnets_0_conv1" in sdxl


def test_onnx_backend_refuses_clearly():
    from sdengine.backends.onnx import OnnxBackend

    with pytest.raises(ValueError, match="onnx backend cannot merge LoRAs"):
        OnnxBackend.weight_views(None)
    with pytest.raises(ValueError, match="textual-inversion"):
        OnnxBackend.add_token_embeddings(None, {})


@pytest.mark.gpu
def test_hot_swap_under_real_cuda_graphs_fp16(files):
    """CUDA: the Triton backend's graphed fused step and graphed UNet, fp16 + channels_last. A
    swap adds no capture; the replayed graphs compute with the swapped weights (they match the
    eager backend with the same LoRA), and [] gives the first images back exactly."""
    pytest.importorskip("triton")
    fast = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")).to("cuda", torch.float16), backend="triton")
    eager = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")).to("cuda", torch.float16))
    before = _state(fast)
    outputs = []
    for loras in ([], [(files["kohya"], 0.8)], [(files["peft"], 1.0), (files["other"], 0.5)], []):
        fast.set_loras(loras)
        eager.set_loras(loras)
        for sampler in ("euler", "heun"):  # the fused step's graph, and the graphed UNet alone
            got = _images(fast, "sd15", sampler=sampler, guidance_scale=5.0)
            assert max_diff(got, _images(eager, "sd15", sampler=sampler, guidance_scale=5.0)) <= 2 * TOL
            outputs.append(got)
        if len(outputs) == 2:
            entries = list(fast.backend.graphs.entries)
    assert list(fast.backend.graphs.entries) == entries  # captured on the first run only
    assert max_diff(outputs[0], outputs[2]) > 10 * TOL
    assert max_diff(outputs[0], outputs[6]) == 0.0 and max_diff(outputs[1], outputs[7]) == 0.0
    _assert_bit_exact(fast, before)
