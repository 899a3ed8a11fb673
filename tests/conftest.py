import sys
from pathlib import Path

import pytest

# Scenario modules shared by in-process and multi-process tests live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def full():
    """A full reference KV cache (all heads) for the simulated-rank connector tests."""
    from kvdist.connectors.testing import full_kv, tp_context

    return full_kv(tp_context(0, 1))
