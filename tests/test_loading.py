"""Checkpoint loading: diffusers folders, LDM single files (.safetensors, .ckpt), detection, errors.

References: the diffusers / transformers tiny pipelines of tests/support/tiny.py. Single files are
written by tests/support/ldm_keys.py, a key map independent of sdengine/ldm_layout.py. Every loaded
network's state_dict must equal the reference's exactly (same keys, same values).
Budget: about 40 s on 2 CPU cores.
"""

import json
import shutil
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdengine.config import PRESETS, ModelConfig, tiny_config
from sdengine.ldm_layout import detect_config, to_ldm_state_dict
from sdengine.errors import ModelLoadError
from sdengine.loading import detect, load_model
from sdengine.single_file import save_single_file
from support.ldm_keys import TEXT_LAYOUT, ldm_state_dict, save_ldm_single_file
from support.tiny import TINY_KINDS, diffusers_unet_kwargs, diffusers_vae_kwargs, save_tiny_pipeline, tiny_pipeline, \
    transformers_text_config

NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kind -> a saved tiny diffusers pipeline folder (made on first use)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = save_tiny_pipeline(kind, tmp_path_factory.mktemp(kind))
        return cache[kind]
    return get


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """(kind, suffix) -> a tiny LDM single file (made on first use)."""
    cache = {}

    def get(kind, suffix=".safetensors"):
        if (kind, suffix) not in cache:
            cache[kind, suffix] = save_ldm_single_file(kind, tmp_path_factory.mktemp(kind) / f"model{suffix}")
        return cache[kind, suffix]
    return get


def reference_state(kind: str, network: str) -> dict:
    """The diffusers / transformers network's state_dict, with transformers 5's CLIPTextModel
    keys given back their `text_model.` level (the layout of SD checkpoints and of sdengine)."""
    state = getattr(tiny_pipeline(kind), network).state_dict()
    if network.startswith("text_encoder"):
        state = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
                 for k, v in state.items()}
    return state


def assert_same_weights(loaded, kind: str, dtype=torch.float32):
    for network in NETWORKS:
        module = getattr(loaded, network)
        if getattr(tiny_pipeline(kind), network, None) is None:
            assert module is None, network
            continue
        expected, got = reference_state(kind, network), module.state_dict()
        assert set(got) == set(expected), f"{network}: keys differ: {sorted(set(got) ^ set(expected))[:5]}"
        for key, tensor in expected.items():
            assert got[key].dtype == dtype, f"{network}.{key}"
            assert torch.equal(got[key], tensor.to(dtype)), f"{network}.{key} differs"
        assert not any(p.requires_grad for p in module.parameters()) and not module.training


# ---------------------------------------------------------------------------
# Loading: exact weights
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", TINY_KINDS)
def test_diffusers_folder(kind, folders):
    folder = folders(kind)
    loaded = load_model(folder, device="cpu", progress=False)
    assert loaded.source == "diffusers"
    assert loaded.config == ModelConfig.from_diffusers(folder)
    assert_same_weights(loaded, kind)
    openclip_pad = kind == "sd21-v"
    assert loaded.tokenizer.pad_token == ("!" if openclip_pad else "<|endoftext|>")
    assert (loaded.tokenizer_2 is not None) == (kind == "sdxl")
    if kind == "sdxl":
        assert loaded.tokenizer_2.pad_token == "!"
    prompts = ["a photo of a cat", "Hello, World!!"]
    expected = tiny_pipeline(kind).tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                             return_tensors="pt").input_ids
    assert torch.equal(loaded.tokenizer(prompts), expected)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_single_file_safetensors(kind, single_files):
    """Detected config only: heads and norm groups do not shape tensors, so the weights load."""
    loaded = load_model(single_files(kind), device="cpu", progress=False)
    assert loaded.source == "single-file"
    assert loaded.config == detect(single_files(kind))
    assert_same_weights(loaded, kind)
    assert loaded.tokenizer.pad_token == ("!" if kind == "sd21-v" else "<|endoftext|>")
    assert (loaded.tokenizer_2 and loaded.tokenizer_2.pad_token) == ("!" if kind == "sdxl" else None)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_single_file_ckpt(kind, single_files):
    loaded = load_model(single_files(kind, ".ckpt"), device="cpu", config=tiny_config(kind), progress=False)
    assert loaded.source == "ckpt"
    assert loaded.config == tiny_config(kind)
    assert_same_weights(loaded, kind)


def test_single_file_network_outputs_match_diffusers(single_files):
    """The converted SD2 networks (fused q/k/v split, 1x1-conv VAE attention) compute what
    diffusers / transformers compute: a check beyond equal state_dicts."""
    kind = "sd21-v"
    loaded = load_model(single_files(kind), device="cpu", config=tiny_config(kind), progress=False)
    pipe = tiny_pipeline(kind)
    generator = torch.Generator().manual_seed(0)
    ids = loaded.tokenizer(["a red cube on a table", ""])
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        hidden, _ = loaded.text_encoder(ids)
        expected_hidden = pipe.text_encoder(ids).last_hidden_state
        noise = loaded.unet(latents, torch.tensor([500, 500]), hidden)
        expected_noise = pipe.unet(latents, torch.tensor([500, 500]), expected_hidden).sample
        image = loaded.vae.decode(latents)
        expected_image = pipe.vae.decode(latents).sample
    for got, want in ((hidden, expected_hidden), (noise, expected_noise), (image, expected_image)):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6


def test_dtypes(folders, single_files):
    assert_same_weights(load_model(folders("sd15"), device="cpu", dtype=torch.float16, progress=False),
                        "sd15", torch.float16)
    loaded = load_model(single_files("sd15"), device="cpu", dtype="bf16", config=tiny_config("sd15"), progress=False)
    assert_same_weights(loaded, "sd15", torch.bfloat16)


def test_default_device_and_dtype(single_files):
    loaded = load_model(single_files("sd15"), config=tiny_config("sd15"), progress=False)
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    expected_dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    param = next(loaded.unet.parameters())
    assert param.device.type == expected_device and param.dtype == expected_dtype


def test_sdxl_linear_text_projection(single_files, tmp_path):
    """Some converted SDXL files hold text_projection as a Linear weight, (proj, width)."""
    def to_linear(state):
        key = "conditioner.embedders.1.model.text_projection"
        state[key + ".weight"] = state.pop(key).t().contiguous()
    path = _edited(single_files("sdxl"), tmp_path, to_linear)
    assert_same_weights(_load(path, config=tiny_config("sdxl")), "sdxl")


def test_sd1_layout_variants(single_files, tmp_path):
    """The oldest SD1 files omit CLIP's "text_model." level; some converted files store the VAE
    attention projections as (C, C) linear weights instead of (C, C, 1, 1) convolutions."""
    def vary(state):
        for key in [k for k in state if k.startswith("cond_stage_model.transformer.text_model.")]:
            state[key.replace(".text_model.", ".", 1)] = state.pop(key)
        for key in [k for k in state if ".mid.attn_1." in k and k.endswith("weight") and state[k].ndim == 4]:
            state[key] = state[key][:, :, 0, 0].contiguous()
    path = _edited(single_files("sd15"), tmp_path, vary)
    assert_same_weights(_load(path, config=tiny_config("sd15")), "sd15")


def test_fp16_single_file_to_fp32(tmp_path):
    path = save_ldm_single_file("sd15", tmp_path / "half.safetensors", dtype=torch.float16)
    loaded = load_model(path, device="cpu", dtype=torch.float32, config=tiny_config("sd15"), progress=False)
    for network in ("unet", "vae", "text_encoder"):
        for key, tensor in reference_state("sd15", network).items():
            assert torch.equal(getattr(loaded, network).state_dict()[key], tensor.half().float()), key


def test_fp16_variant_bin_and_shards(folders, tmp_path):
    """diffusion_pytorch_model.fp16.safetensors, pickled .bin and sharded safetensors folders."""
    folder = shutil.copytree(folders("sd15"), tmp_path / "variants")
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet_file.rename(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(vae_file), folder / "vae" / "diffusion_pytorch_model.bin")
    vae_file.unlink()
    text_file = folder / "text_encoder" / "model.safetensors"
    state, index = load_file(text_file), {}
    for number, part in enumerate((dict(list(state.items())[:20]), dict(list(state.items())[20:]))):
        name = f"model-0000{number + 1}-of-00002.safetensors"
        save_file(part, folder / "text_encoder" / name)
        index |= {k: name for k in part}
    (folder / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    text_file.unlink()
    assert_same_weights(load_model(folder, device="cpu", progress=False), "sd15")


# ---------------------------------------------------------------------------
# Writing single files
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", TINY_KINDS)
def test_save_single_file_round_trip(kind, folders, tmp_path):
    loaded = load_model(folders(kind), device="cpu", progress=False)
    # The write direction of ldm_layout.py agrees with the independent writer of ldm_keys.py
    # on every tensor both hold (ldm_keys adds random stand-ins for SD2's unused OpenCLIP
    # layer and projection, CLIP's logit_scale, position_ids and the schedule buffers).
    written = to_ldm_state_dict(loaded.config, {name: getattr(loaded, name).state_dict() for name in NETWORKS
                                                if getattr(loaded, name) is not None})
    independent = ldm_state_dict(tiny_pipeline(kind), TEXT_LAYOUT[kind])
    unused_sd2_layer = f"cond_stage_model.model.transformer.resblocks.{loaded.config.text_encoder.num_hidden_layers}."
    stand_ins = ("logit_scale", "position_ids", "cond_stage_model.model.text_projection", unused_sd2_layer,
                 "betas", "alphas_cumprod", "model_ema.")
    shared = [key for key in independent if not any(part in key for part in stand_ins)]
    assert len(shared) > 300 and set(shared) <= set(written)
    for key in shared:
        assert written[key].shape == independent[key].shape and torch.equal(written[key], independent[key]), key

    path = save_single_file(loaded, tmp_path / "model.safetensors", dtype=torch.float32)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left behind
    assert detect(path).prediction_type == loaded.config.prediction_type
    assert_same_weights(load_model(path, device="cpu", config=loaded.config, progress=False), kind)


def test_save_single_file_records_epsilon_for_sd2(folders, tmp_path):
    """SD2 single files default to v-prediction; a written 512-base (epsilon) model says otherwise."""
    loaded = load_model(folders("sd21-v"), device="cpu", prediction_type="epsilon", progress=False)
    path = save_single_file(loaded, tmp_path / "sd2-base.safetensors", dtype=torch.float16)
    assert detect(path).prediction_type == "epsilon" and detect(path).name == "sd21"
    with pytest.raises(ValueError, match="safetensors"):
        save_single_file(loaded, tmp_path / "model.ckpt")
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        save_single_file(loaded, tmp_path / "no-such-folder" / "model.safetensors")


# ---------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------

def _derivable(config: ModelConfig) -> dict:
    """What a single file's shapes record (not: head counts, norm groups, sample sizes, names)."""
    u, v = config.unet, config.vae
    fields = dict(
        unet=(u.in_channels, u.out_channels, u.block_out_channels, u.down_block_types, u.up_block_types,
              u.layers_per_block, u.cross_attention_dim, u.use_linear_projection, u.addition_embed_type,
              u.addition_time_embed_dim, u.projection_class_embeddings_input_dim,
              tuple(d for d, t in zip(u.transformer_layers_per_block, u.down_block_types) if "CrossAttn" in t),
              u.transformer_layers_per_block[-1]),  # the middle block's depth
        vae=(v.in_channels, v.out_channels, v.latent_channels, v.block_out_channels, v.layers_per_block),
        prediction=config.prediction_type,
    )
    for name in ("text_encoder", "text_encoder_2"):
        t = getattr(config, name)
        fields[name] = t and (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers,
                              t.max_position_embeddings, t.hidden_act, t.projection_dim, t.output_layer)
    return fields


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_detect_single_file(kind, single_files):
    config = detect(single_files(kind))
    assert config.name == {"sd15": "sd15", "sd15-inpaint": "sd15-inpaint", "sd21-v": "sd21-v", "sdxl": "sdxl"}[kind]
    assert _derivable(config) == _derivable(tiny_config(kind))


def _meta_pipeline(config: ModelConfig):
    """Full-size diffusers / transformers networks on the meta device (shapes, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def text(cfg):
        return (CLIPTextModelWithProjection if cfg.projection_dim else CLIPTextModel)(transformers_text_config(cfg))
    with torch.device("meta"):
        return types.SimpleNamespace(
            unet=UNet2DConditionModel(**diffusers_unet_kwargs(config.unet)),
            vae=AutoencoderKL(**diffusers_vae_kwargs(config.vae)),
            text_encoder=text(config.text_encoder),
            text_encoder_2=config.text_encoder_2 and text(config.text_encoder_2))


@pytest.mark.parametrize("name, layout, prediction", [
    ("sd15", "sd1", None), ("sd15-inpaint", "sd1", None), ("sd21-v", "sd2", None), ("sd21", "sd2", "epsilon"),
    ("sdxl", "sdxl", None)])
def test_detect_real_architectures(name, layout, prediction):
    """The key shapes of full-size SD1.5 / SD2.1 / SDXL checkpoints give back the presets exactly."""
    preset = PRESETS[name]
    # ldm_keys writes SD2's OpenCLIP tower with its unused 24th layer, as real SD2 files hold it.
    state = ldm_state_dict(_meta_pipeline(preset), layout)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    config, _ = detect_config(shapes, prediction_type=prediction)
    assert config == preset


def test_prediction_type_rules(single_files, tmp_path):
    assert detect(single_files("sd15")).prediction_type == "epsilon"
    assert detect(single_files("sd21-v")).prediction_type == "v_prediction"  # SD2 default
    assert detect(single_files("sd21-v"), prediction_type="epsilon").name == "sd21"
    loaded = load_model(single_files("sd21-v"), device="cpu", prediction_type="epsilon", progress=False)
    assert loaded.config.prediction_type == "epsilon"
    state = load_file(single_files("sd15"))
    state["v_pred"] = torch.tensor([])  # A1111 / ComfyUI marker of a v-prediction SD1 model
    save_file(state, tmp_path / "vpred.safetensors")
    assert detect(tmp_path / "vpred.safetensors").prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        detect(single_files("sd15"), prediction_type="sample-ish")


def test_detect_diffusers_folder(folders):
    folder = folders("sd21-v")
    assert detect(folder) == ModelConfig.from_diffusers(folder)


# ---------------------------------------------------------------------------
# sdengine info
# ---------------------------------------------------------------------------

def test_info_cli(single_files, folders, capsys):
    from sdengine.cli import main

    assert main(["info", str(single_files("sd21-v"))]) == 0
    out = capsys.readouterr().out
    assert "sd21-v" in out and "v_prediction" in out and "OpenCLIP, 2 layers, width 32" in out
    assert "single-file" in out and "linear proj_in" in out and "levels [32, 64]" in out
    assert main(["info", str(folders("sdxl"))]) == 0
    out = capsys.readouterr().out
    assert "sdxl" in out and "diffusers folder" in out and "text encoder 2" in out and "text_time" in out
    assert main(["info", "--json", "--prediction-type", "epsilon", str(single_files("sd21-v"))]) == 0
    assert json.loads(capsys.readouterr().out)["scheduler"]["prediction_type"] == "epsilon"
    assert main(["info", str(single_files("sd15").parent / "nothing.safetensors")]) == 2
    assert "nothing.safetensors" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Bad input: each a clear exception, naming the path, file or key
# ---------------------------------------------------------------------------

def _load(path, **kw):
    return load_model(path, device="cpu", progress=False, **kw)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        _load(tmp_path / "no-such-model.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        _load(tmp_path / "empty")


def test_missing_component_file(folders, tmp_path):
    folder = shutil.copytree(folders("sd15"), tmp_path / "incomplete")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"vae"):
        _load(folder)


def test_unknown_architecture(single_files, folders, tmp_path):
    save_file({"encoder.weight": torch.zeros(2), "lora_unet_down.alpha": torch.zeros(1)}, tmp_path / "lora.safetensors")
    with pytest.raises(ModelLoadError, match=r"lora.safetensors.*model.diffusion_model.*found: encoder.weight"):
        _load(tmp_path / "lora.safetensors")
    state = {k: v for k, v in load_file(single_files("sd15")).items() if not k.startswith("cond_stage_model.")}
    save_file(state, tmp_path / "no-text.safetensors")
    with pytest.raises(ModelLoadError, match="no text encoder"):
        _load(tmp_path / "no-text.safetensors")
    state = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
             for k, v in load_file(single_files("sdxl")).items() if not k.startswith("conditioner.embedders.0.")}
    save_file(state, tmp_path / "refiner.safetensors")  # a refiner's text encoder over a base's UNet (6 numbers)
    with pytest.raises(ModelLoadError, match="added embedding"):
        _load(tmp_path / "refiner.safetensors")
    def depth_model(state):  # SD2-depth: a 5th input channel
        key = "model.diffusion_model.input_blocks.0.0.weight"
        state[key] = torch.cat([state[key], state[key][:, :1]], dim=1)
    with pytest.raises(ModelLoadError, match="5 input channels"):
        _load(_edited(single_files("sd21-v"), tmp_path, depth_model))
    folder = shutil.copytree(folders("sd15"), tmp_path / "odd-unet")
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="UNet2DModel"):
        _load(folder)
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="model_index.json is not valid JSON"):
        _load(folder)
    (tmp_path / "model.onnx").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="unsupported file type"):
        _load(tmp_path / "model.onnx")


def test_truncated_and_corrupt_safetensors(single_files, folders, tmp_path):
    data = single_files("sd15").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"truncated.safetensors.*(truncated|corrupt)"):
        _load(tmp_path / "truncated.safetensors")
    corrupt = bytearray(data)
    for offset in (12, 40, 200):  # inside the JSON header (it starts after an 8-byte length)
        corrupt[offset] ^= 0xA5
    (tmp_path / "corrupt.safetensors").write_bytes(bytes(corrupt))
    with pytest.raises(ModelLoadError, match="corrupt.safetensors"):
        _load(tmp_path / "corrupt.safetensors")
    folder = shutil.copytree(folders("sd15"), tmp_path / "truncated-folder")
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet_file.write_bytes(unet_file.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=r"unet/diffusion_pytorch_model.safetensors"):
        _load(folder)


def test_truncated_and_unsafe_ckpt(single_files, tmp_path):
    data = single_files("sd15", ".ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match="truncated.ckpt"):
        _load(tmp_path / "truncated.ckpt")
    # A pickle holding an arbitrary object is refused by torch.load(weights_only=True).
    torch.save({"state_dict": {}, "callback": types.SimpleNamespace(x=1)}, tmp_path / "unsafe.ckpt")
    with pytest.raises(ModelLoadError, match=r"unsafe.ckpt.*weights_only"):
        _load(tmp_path / "unsafe.ckpt")


def _replace_file(state, path):
    """Write state over path through a new file: load_file's tensors may be memory-mapped
    from path itself, and truncating a mapped file under them would crash the process."""
    temporary = path.with_suffix(".tmp")
    save_file(state, temporary)
    temporary.replace(path)


def _edited(source, tmp_path, edit):
    state = load_file(source)
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, path)
    return path


def test_missing_key(single_files, folders, tmp_path):
    key = "model.diffusion_model.output_blocks.1.1.conv.weight"
    path = _edited(single_files("sd15"), tmp_path, lambda s: s.pop(key))
    with pytest.raises(ModelLoadError, match=r"edited.safetensors: 1 unet weights missing.*output_blocks.1.1.conv"):
        _load(path, config=tiny_config("sd15"))
    folder = shutil.copytree(folders("sd15"), tmp_path / "missing")
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(vae_file)
    del state["decoder.conv_out.bias"]
    _replace_file(state, vae_file)
    with pytest.raises(ModelLoadError, match=r"vae weights missing.*decoder.conv_out.bias"):
        _load(folder)


def test_extra_key(single_files, folders, tmp_path):
    def add(state):
        state["model.diffusion_model.input_blocks.1.1.extra_gate.weight"] = torch.zeros(3)
    with pytest.raises(ModelLoadError, match=r"edited.safetensors: 1 unexpected weights.*extra_gate"):
        _load(_edited(single_files("sd15"), tmp_path, add), config=tiny_config("sd15"))
    folder = shutil.copytree(folders("sd15"), tmp_path / "extra")
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(unet_file)
    state["mid_block.attentions.0.surprise"] = torch.zeros(1)
    _replace_file(state, unet_file)
    with pytest.raises(ModelLoadError, match=r"unexpected weights.*mid_block.attentions.0.surprise"):
        _load(folder)


def test_shape_mismatch(single_files, folders, tmp_path):
    key = "first_stage_model.decoder.conv_in.weight"

    def grow(state):
        state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    with pytest.raises(ModelLoadError, match=r"shape mismatch for 'first_stage_model.decoder.conv_in.weight': "
                                             r"found \[65, 4, 3, 3\].*expects \[64, 4, 3, 3\]"):
        _load(_edited(single_files("sd15"), tmp_path, grow), config=tiny_config("sd15"))
    folder = shutil.copytree(folders("sd15"), tmp_path / "shape")
    text_file = folder / "text_encoder" / "model.safetensors"
    state = load_file(text_file)
    key = next(k for k in state if k.endswith("final_layer_norm.weight"))
    state[key] = torch.ones(31)
    _replace_file(state, text_file)
    with pytest.raises(ModelLoadError, match=r"final_layer_norm.weight.*found \[31\].*expects \[32\]"):
        _load(folder)
