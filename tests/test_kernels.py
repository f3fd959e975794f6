"""The lens' vocabulary reductions: the log-normaliser used by the cloze lens."""

import shutil

import pytest
import torch

from declens.kernels import log_normalizer, softcap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cap", [None, 30.0])
def test_log_normalizer_equals_float32_log_softmax(dtype, cap):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(7, 5003, generator=g) * 40).to(dtype)
    ref = z.float()
    if cap:
        ref = torch.tanh(ref / cap) * cap
    want = ref - torch.log_softmax(ref, dim=-1)  # logsumexp, row by row (constant along the row)
    got = log_normalizer(z, cap)
    assert got.dtype == torch.float32 and got.shape == (7,)
    torch.testing.assert_close(got, want[:, 0], rtol=0, atol=1e-4)


def test_softcap_bounds_and_identity():
    z = torch.tensor([-1e4, -3.0, 0.0, 3.0, 1e4])
    assert torch.equal(softcap(z, None), z)
    capped = softcap(z, 30.0)
    assert capped.abs().max() <= 30.0 and capped[2] == 0
    assert torch.allclose(capped[1:4], z[1:4], atol=0.05)  # near-identity for small logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_normalizer_applies_the_logit_scale_before_the_cap(dtype):
    """Cohere / Granite scale the head's product; the log-normaliser sees the transformed logits."""
    from declens.kernels import LogitTransform

    g = torch.Generator().manual_seed(1)
    z = (torch.randn(5, 4001, generator=g) * 40).to(dtype)
    t = LogitTransform(scale=0.25, cap=8.0)
    ref = torch.tanh(z.float() * 0.25 / 8.0) * 8.0
    torch.testing.assert_close(t(z.float()), ref)
    got = log_normalizer(z, t.cap, t.scale)
    torch.testing.assert_close(got, torch.logsumexp(ref, dim=-1), rtol=0, atol=1e-4)
    assert not torch.allclose(got, log_normalizer(z, t.cap), atol=1e-2)  # the scale matters
    assert torch.equal(LogitTransform()(z), z)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernel runs on CUDA only")
@pytest.mark.parametrize("scale,cap", [(1.0, None), (0.0625, None), (0.125, 30.0)])
def test_fused_log_normalizer_on_cuda_equals_the_float32_computation(scale, cap):
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(9, 32003, generator=g) * 40).to(torch.bfloat16)
    want = log_normalizer(z, cap, scale)  # CPU: the plain float32 computation
    got = log_normalizer(z.cuda(), cap, scale).cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("g++") is None, reason="torch.compile needs a C++ compiler on the CPU")
def test_compiled_log_normalizer_on_the_cpu_equals_float32(monkeypatch):
    """Large vocabularies use the compiled kernel on the CPU too: same numbers as the float32 reference."""
    from declens import kernels

    g = torch.Generator().manual_seed(2)
    z = (torch.randn(6, 4099, generator=g) * 40).bfloat16()
    assert kernels.use_fused(z, "on")
    got = log_normalizer(z, fused="on")
    assert kernels._fused.get("fn") is not None  # the compiled kernel ran (a failure would have reset it)
    torch.testing.assert_close(got, torch.logsumexp(z.float(), dim=-1), rtol=0, atol=1e-4)


def test_compiled_log_normalizer_is_chosen_by_vocabulary_size_on_the_cpu(monkeypatch):
    from declens.kernels import CPU_FUSED_MIN_VOCAB, use_fused

    small, large = torch.empty(2, 49152), torch.empty(2, CPU_FUSED_MIN_VOCAB)
    assert not use_fused(small) and use_fused(large)
    assert not use_fused(large, "off")
