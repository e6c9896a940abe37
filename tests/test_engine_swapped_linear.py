import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftserve.engine.torch.swapped_linear import install


class Subclassed(nn.Linear):
    pass


@pytest.mark.parametrize("rows", [1, 2, 11, 12, 32, 200])
@pytest.mark.parametrize("bias", [True, False])
def test_installed_linear_is_bit_identical_to_f_linear(rows, bias):
    torch.manual_seed(0)
    layer = nn.Linear(96, 160, bias=bias)
    x = torch.randn(rows, 96)
    expected = F.linear(x, layer.weight, layer.bias)
    assert install(layer) == 1
    assert torch.equal(layer(x), expected)


def test_install_leaves_subclasses_and_bf16_alone():
    model = nn.Sequential(nn.Linear(8, 8), Subclassed(8, 8), nn.Linear(8, 8).to(torch.bfloat16))
    assert install(model) == 1
    assert "forward" in vars(model[0]) and "forward" not in vars(model[1]) and "forward" not in vars(model[2])
