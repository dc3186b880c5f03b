"""int8 post-training quantization of the UNet on the CPU, through PyTorch's own flow (PT2E).

    pipe = sdengine.load(path, backend="compile", dtype="fp32", backend_options={"quantize": "int8"})

Static quantization with Inductor's x86 recipe (`X86InductorQuantizer`: int8 activations per
tensor, int8 weights per output channel, convolutions and linears), per workload shape:

1. `torch.export` of the UNet at the shape of its first call (batch, latent size, context);
2. `prepare_pt2e` inserts observers; calibration runs the observed UNet on inputs of the model's
   own: contexts from its text encoder on random token sequences (BOS, words, EOS, padding), latents
   of unit variance (what the samplers feed the UNet after scale_model_input) at timesteps spread
   over the schedule, the unconditional and conditional halves as classifier-free guidance has them;
3. `convert_pt2e`, then torchao's x86 lowering (Inductor's constant folding and freezing
   patterns: oneDNN's int8 convolutions and linears, VNNI / AMX-INT8, with prepacked weights).

PT2E lives in torchao since torch 2.10 (`pip install 'sdengine[int8]'`). It is an opt-in, never a
default: its fidelity against fp32 is measured per run (sdengine bench's MAE of every row, and
tests/test_quantize.py on the demo model's digits), and a LoRA change quantizes again.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import nn

log = logging.getLogger("sdengine")

INSTALL = "pip install 'sdengine[int8]' (torchao: PyTorch's PT2E quantization flow lives there since torch 2.10)"
CALIBRATION_TIMESTEPS = (999, 800, 600, 400, 200, 50)  # spread over the 1000-step training schedule
CALIBRATION_SEQUENCES = 4  # random token sequences through the model's text encoder


def _pt2e():
    try:
        from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as e:
        raise RuntimeError(f"quantize='int8' needs PyTorch's PT2E flow ({e}): {INSTALL}") from None
    return prepare_pt2e, convert_pt2e, x86, lower_pt2e_quantized_to_x86


class _UNetCall(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context):
        return self.unet(x, t, context)


def calibration_inputs(text_encoder, config, x_shape: tuple, context_length: int, seed: int = 0) -> list:
    """(x, t, context) sets of the model's own at the UNet's shape (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    cfg = config.text_encoder
    batch = x_shape[0]
    contexts = []
    with torch.inference_mode():
        for _ in range(CALIBRATION_SEQUENCES):
            words = int(torch.randint(3, 30, (), generator=generator))
            ids = torch.full((batch, context_length), cfg.pad_token_id if cfg.pad_token_id is not None
                             else cfg.eos_token_id, dtype=torch.long)
            ids[:, 0] = cfg.vocab_size - 2  # BOS
            ids[batch // 2:, 1:1 + words] = torch.randint(256, cfg.vocab_size - 2, (batch - batch // 2, words),
                                                          generator=generator)
            ids[:batch // 2, 1] = cfg.vocab_size - 1  # the unconditional half: the empty prompt
            ids[batch // 2:, 1 + words] = cfg.vocab_size - 1  # EOS
            contexts.append(text_encoder(ids)[0].float())
    sets = []
    for i, t in enumerate(CALIBRATION_TIMESTEPS):
        x = torch.randn(x_shape, generator=generator)
        sets.append((x, torch.full((batch,), float(t)), contexts[i % len(contexts)]))
    return sets


def quantize_unet_int8(unet: nn.Module, calibration: list) -> Callable:
    """The UNet quantized to int8 (PT2E, X86InductorQuantizer, static) at the calibration inputs'
    shapes, lowered to oneDNN's int8 kernels. Returns fn(x, t, context) -> float32 output."""
    prepare_pt2e, convert_pt2e, x86, lower_pt2e_quantized_to_x86 = _pt2e()
    started = time.perf_counter()
    module = _UNetCall(unet).eval()
    with torch.no_grad():
        exported = torch.export.export(module, calibration[0]).module()
        quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for args in calibration:
            prepared(*args)
        converted = convert_pt2e(prepared)
        # torchao's x86 lowering: constant folding and Inductor's freezing patterns, which fuse each
        # dequantize -> conv / linear -> quantize into oneDNN's int8 kernels with prepacked weights
        lowered = lower_pt2e_quantized_to_x86(converted, calibration[0])
    log.info("int8: the UNet quantized at %s in %.1f s", tuple(calibration[0][0].shape), time.perf_counter() - started)
    return lowered
