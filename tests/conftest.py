import pytest
import torch

# The test networks are tiny: one thread beats two (no synchronisation), and the suite
# stays fast on CI's 2 cores even when the machine is busy.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
