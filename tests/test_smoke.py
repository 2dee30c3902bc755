import torch
from torch import nn

import tt_conv


def test_every_factorization_matches_a_conv_at_full_rank():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    for factorization in ("cp", "tucker", "tt"):
        layer = tt_conv.FactorizedConv.from_conv(conv, factorization=factorization, rank=10**6)
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-5)
