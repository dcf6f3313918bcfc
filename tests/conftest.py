"""Test setup: 8 virtual CPU devices (set before JAX starts), and shared fixtures."""

import json
import os
import subprocess
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def assert_same_trained_params(params, expected) -> None:
    """Parameters after a few AdamW steps taken two ways (meshes, micro-batching) agree.

    Adam normalises each update to about +-lr, so float-rounding differences in near-zero
    gradients show up at the scale of the learning rate, not of float32 eps: hence 3e-5
    absolute. Attention key biases are not compared: their gradient is exactly zero (they
    shift all of a query's logits by q.b_k, which softmax ignores), so their updates are
    rounding noise that Adam scales up to the learning rate, and differ in sign."""
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree.leaves(expected), strict=True):
        name = jax.tree_util.keystr(path)
        if name.endswith("['attn']['k']['bias']"):
            continue
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=3e-5, err_msg=name)


# Python that reads the kernels of a compiled HLO text: `kernel_matmuls(text)` gives the
# (FLOPs, "lhs x rhs" shapes) of each kernel XLA runs with matmuls in it, the entry
# computation's dots and the fusions holding them, as experiments/profile_step.py counts them.
KERNEL_MATMULS = """
from experiments.profile_step import hlo_computations, matmul_flops
def kernel_matmuls(hlo_text):
    computations = hlo_computations(hlo_text)
    flops = matmul_flops(computations)
    (entry,) = (body for name, body in computations.items() if name.startswith("main"))
    return [flops[i[0]] for i in entry if i[0] in flops]
"""


def json_from_fresh_process(code: str, *args: str, **env: str):
    """Runs `code` (`args` as its `sys.argv[1:]`) in a fresh CPU-only Python from the repository
    root, with no environment but `env`, and returns the JSON of its last printed line. For
    what must not touch the test process: glibc's malloc options (`experiments.throughput`
    sets them for its whole process, as its benchmarks need), or XLA flags of its own."""
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                            text=True, check=True,
                            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", **env})
    return json.loads(result.stdout.strip().splitlines()[-1])


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
