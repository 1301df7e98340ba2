"""Fixtures every test directory may use."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread (restored after): on the shared 2-core machine,
    OpenMP threads contending with other processes made small convolutions up to 20x
    slower. Used through ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
