import sys
from pathlib import Path

import pytest

# Scenario modules shared by in-process and multi-process tests live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _fingerprint_cache(tmp_path_factory):
    """Checkpoint digests go to a directory of this session (the ranks the tests start
    inherit it), not to the user's cache."""
    import os

    old = os.environ.get("KVDIST_FINGERPRINT_CACHE")
    os.environ["KVDIST_FINGERPRINT_CACHE"] = str(tmp_path_factory.mktemp("fingerprints"))
    yield
    if old is None:
        os.environ.pop("KVDIST_FINGERPRINT_CACHE", None)
    else:
        os.environ["KVDIST_FINGERPRINT_CACHE"] = old


@pytest.fixture
def full():
    """A full reference KV cache (all heads) for the simulated-rank connector tests."""
    from kvdist.connectors.testing import full_kv, tp_context

    return full_kv(tp_context(0, 1))
