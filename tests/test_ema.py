"""Weight averages: the classic EMA and EDM2's power-function EMA, against their closed forms."""

import math

import pytest
import torch

from fewstep.training.ema import EMA, sigma_rel_to_gamma


class Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))


def run(ema_kwargs, values):
    net = Scalar()
    ema = None
    for k, v in enumerate(values):
        net.w.data.fill_(v)
        if ema is None:
            ema = EMA(net, **ema_kwargs)
        ema.update(net, k)
    return ema.net.w.item()


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_power_ema_has_the_requested_relative_width(sigma_rel):
    """Averaging the weights t and t^2 over T steps gives the mean and second moment of the
    averaging profile; its std / T is sigma_rel (EDM2), and its mean (gamma + 1) / (gamma + 2) T."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(sigma_rel, rel=1e-12)
    T = 4000
    steps = [float(t) for t in range(1, T + 1)]
    m1 = run({"sigma_rel": sigma_rel}, steps)
    m2 = run({"sigma_rel": sigma_rel}, [t * t for t in steps])
    assert m1 / T == pytest.approx((gamma + 1) / (gamma + 2), rel=2e-3)
    assert math.sqrt(m2 - m1 ** 2) / T == pytest.approx(sigma_rel, rel=0.02)


def test_classic_ema_decay_and_warmup():
    ema = EMA(Scalar(), decay=0.9)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10_000) == 0.9
    # constant decay d on a step input: the average approaches it as 1 - d^k
    values = [0.0] * 100 + [1.0] * 50
    assert run({"decay": 0.9}, values) == pytest.approx(1 - 0.9 ** 50, rel=1e-9)
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(0.5)
