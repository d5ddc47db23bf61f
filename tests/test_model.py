"""The paper's network: size, shapes, and batch norm that behaves as batch norm."""
from __future__ import annotations

import pytest
import torch

from vfcore.model import ENCODER_LAYERS, PRESETS, build_model, layer_table, n_parameters


def conv(cin, cout):  # 3x3x3 convolution with bias
    return 27 * cin * cout + cout


def test_paper_parameter_count_by_hand():
    encoder = [(1, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512)]
    total = sum(conv(a, b) + 2 * b for a, b in encoder)                     # conv + BatchNorm3d
    total += sum(conv(a, b) + 2 * b for a, b in [(512, 256), (256, 128), (128, 64), (64, 8)])  # + IN
    total += sum(a * b + b + 2 * b for a, b in [(4096, 256), (256, 128), (128, 64)])  # + BN1d
    total += 64 + 1
    model = build_model("paper")
    assert n_parameters(model) == total
    assert 12.5e6 < total < 13.1e6                                        # "about 12.8 M"


@pytest.mark.parametrize("preset,shapes", [
    ("paper", [(64, 32, 32, 32), (128, 16, 16, 16), (256, 8, 8, 8), (512, 8, 8, 8)]),
    ("small", [(16, 16, 16, 16), (32, 8, 8, 8), (64, 8, 8, 8), (128, 8, 8, 8)]),
])
def test_shapes_per_level(preset, shapes):
    table = layer_table(build_model(preset)).set_index("layer")
    assert [table.loc[name, "output shape"] for name in ENCODER_LAYERS] == shapes
    s = PRESETS[preset].input_size
    assert build_model(preset).eval()(torch.zeros(2, 1, s, s, s)).shape == (2,)


def test_eval_output_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    model = build_model("small")
    x = torch.rand(6, 1, 32, 32, 32)
    model.train()
    for _ in range(3):                     # move the running statistics away from their init
        model(torch.rand(4, 1, 32, 32, 32) * 2)
    model.eval()
    with torch.no_grad():
        alone = torch.cat([model(x[i:i + 1]) for i in range(6)])
        together = model(x)
        shuffled = model(x[[5, 1, 0, 3, 2, 4]])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shuffled, alone[[5, 1, 0, 3, 2, 4]], rtol=1e-5, atol=1e-5)
