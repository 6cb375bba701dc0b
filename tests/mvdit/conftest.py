"""MVDiT tests run tiny models: one intra-op thread, since two OpenMP threads only spin against each other on tiny
matrices on a shared 2-core machine (measured 10x slower per forward/backward under load)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
