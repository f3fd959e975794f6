"""The lens' vocabulary reductions: the log-normaliser used by the cloze lens."""

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
