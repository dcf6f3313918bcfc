"""Test setup: 8 virtual CPU devices (set before JAX starts), and shared fixtures."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import pytest  # noqa: E402


def load_config(name: str = "demo", arg: str | None = "tiny"):
    import importlib

    return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The tiny synthetic_faces build and a tokenizer trained on it, shared by all tests."""
    from flipjax.config import prepare

    root = tmp_path_factory.mktemp("tiny_data")
    config = load_config()
    config.data.data_dir = str(root)
    config.tokenizer.path = str(root / "spm.model")
    prepare(config)
    return config.data.data_dir, config.tokenizer.path


@pytest.fixture
def tiny_config(tiny_data):
    data_dir, tokenizer_path = tiny_data
    config = load_config()
    config.data.data_dir = data_dir
    config.tokenizer.path = tokenizer_path
    return config
