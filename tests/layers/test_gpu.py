"""CUDA checks (skipped without a GPU): the SDPA kernels under bf16 agree with fp32 attention."""

from __future__ import annotations

import pytest
import torch

from multimodal.layers import Transformer, TransformerConfig

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "overrides", [{}, {"window": 64}, {"position": "alibi"}, {"n_kv_heads": 2}]
)
def test_bf16_attention_on_cuda_matches_fp32(overrides):
    config = TransformerConfig(dim=256, n_layers=2, n_heads=4, causal=True, position="rope")
    model = Transformer(TransformerConfig(**{**config.__dict__, **overrides})).cuda()
    x = torch.randn(2, 512, 256, device="cuda")
    with torch.no_grad():
        expected = model(x).hidden
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x).hidden
    assert (out.float() - expected).abs().mean() < 0.05


def test_kv_cache_decoding_on_cuda_equals_full_forward():
    config = TransformerConfig(
        dim=128, n_layers=2, n_heads=4, n_kv_heads=1, causal=True, position="rope"
    )
    model = Transformer(config).cuda().eval()
    x = torch.randn(2, 16, 128, device="cuda")
    with torch.no_grad():
        full = model(x).hidden
        cache = model.init_cache()
        steps = [model(x[:, t : t + 1], cache=cache).hidden for t in range(16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
