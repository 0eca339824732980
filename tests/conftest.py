"""Shared test setup.

The suite runs with 8 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set by the README's
test command and by .ci/run); set it here too, before jax is imported, so that a bare `pytest` behaves the same.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAXCHAT_DTYPE", "float32")

import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NANOCHAT_TINY = os.path.join(FIXTURES, "nanochat-tiny")


@pytest.fixture(autouse=True)
def _isolated_base_dir(tmp_path, monkeypatch):
    """Every test gets its own empty $JAXCHAT_BASE_DIR, so nothing touches ~/.cache/jaxchat."""
    monkeypatch.setenv("JAXCHAT_BASE_DIR", str(tmp_path / "jaxchat_base"))
