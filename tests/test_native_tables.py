"""The native runtime's tables against Python's: the C++ tokenizer, the sampler name table, the schedules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdengine.config import SchedulerConfig
from sdengine.samplers import NAMES, make_plan, resolve
from support.native import model_dir, one_thread

_C = pytest.importorskip("sdengine._C")


# ---------------------------------------------------------------------------
# Shared tables: tokenizer, sampler names, schedules
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_cpp_tokenizer_ids_equal_python_on_corpus(tmp_path, pad_token):
    from sdengine.tokenizer import CLIPTokenizer
    from test_tokenizer import CORPUS, write_tokenizer_folder

    folder = write_tokenizer_folder(tmp_path / "tok", pad_token)
    python, cpp = CLIPTokenizer.from_folder(folder), _C.Tokenizer(str(folder))
    mismatches = [(p, python.tokens(p), cpp.tokens(p)) for p in CORPUS if python.tokens(p) != cpp.tokens(p)]
    assert not mismatches, f"{len(mismatches)} of {len(CORPUS)} prompts differ, first: {mismatches[0]}"
    assert len(CORPUS) > 50


def test_cpp_tokenizer_reads_tokenizer_json(model_dir):
    """The tiny folder holds only tokenizer.json (what transformers 5 saves)."""
    from sdengine.tokenizer import CLIPTokenizer
    from test_tokenizer import CORPUS

    assert not (model_dir / "tokenizer" / "vocab.json").exists()
    python, cpp = CLIPTokenizer.from_folder(model_dir / "tokenizer"), _C.Tokenizer(str(model_dir / "tokenizer"))
    for prompt in CORPUS[:20]:
        assert cpp.tokens(prompt) == python.tokens(prompt), prompt


def test_sampler_name_table_is_python_table():
    assert _C.name_table("samplers") == list(NAMES["samplers"].items())
    assert _C.name_table("schedules") == list(NAMES["schedules"].items())
    cfg = SchedulerConfig()
    for name in list(NAMES["samplers"]) + ["DPM++ 2M Karras", "Euler a", "k_dpmpp_2m_karras", "euler_karras"]:
        try:
            expected = resolve(name, None, cfg)
        except ValueError:
            continue
        sampler, schedule = _C.parse_sampler(name)
        assert (sampler, schedule or "default") == expected, name
    with pytest.raises(ValueError, match="unknown sampler"):
        _C.parse_sampler("warp drive")


SCHEDULER_CONFIGS = {
    "sd15": SchedulerConfig(),
    "sd21-v": SchedulerConfig(sampler="ddim", prediction_type="v_prediction", timestep_spacing="leading"),
    "trailing-karras": SchedulerConfig(sampler="euler", timestep_spacing="trailing", steps_offset=0,
                                       use_karras_sigmas=True, set_alpha_to_one=True),
    "linspace-linear": SchedulerConfig(sampler="dpmpp_2m", timestep_spacing="linspace", beta_schedule="linear",
                                       beta_start=0.0001, beta_end=0.02, final_sigmas_type="sigma_min"),
}


@pytest.mark.parametrize("cfg_name", sorted(SCHEDULER_CONFIGS))
def test_cpp_plans_equal_python_plans(cfg_name):
    cfg = SCHEDULER_CONFIGS[cfg_name]
    cfg_json = json.dumps({**dict(cfg.extra), **{f: getattr(cfg, f) for f in cfg.__dataclass_fields__
                                                  if f not in ("extra", "sampler")}})
    checked = 0
    for sampler in ("euler", "euler_a", "ddim", "dpmpp_2m", "pndm"):
        for schedule in ("default", "normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform"):
            for steps, strength in ((2, 1.0), (7, 1.0), (30, 1.0), (7, 0.6), (30, 0.35), (2, 0.3)):
                try:
                    plan = make_plan(sampler, schedule, steps, cfg, strength=strength)
                except ValueError:
                    with pytest.raises(ValueError):
                        _C.plan(sampler, schedule, steps, cfg_json, strength)
                    continue
                ours = _C.plan(sampler, schedule, steps, cfg_json, strength)
                where = f"{sampler}/{schedule}/{steps}/strength {strength}"
                assert ours["start"] == plan.start, where
                np.testing.assert_allclose(ours["timesteps"], plan.timesteps.numpy(), rtol=1e-6, atol=1e-4, err_msg=where)
                if plan.is_sigma_sampler:
                    np.testing.assert_allclose(ours["sigmas"], plan.sigmas.numpy(), rtol=1e-6, err_msg=where)
                    assert ours["init_noise_sigma"] == pytest.approx(plan.init_noise_sigma, rel=1e-6), where
                elif sampler == "ddim":
                    np.testing.assert_array_equal(ours["prev_timesteps"], plan.prev_timesteps.numpy(), err_msg=where)
                checked += 1
    assert checked > 100
