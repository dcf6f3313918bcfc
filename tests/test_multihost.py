"""Two processes with 4 CPU devices each (jax.distributed on localhost) see the same global
batches and train to the same losses as one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
from conftest import REPO

WORKER = """
import json, sys
import jax
import numpy as np

data_dir, tok_path, out, count, index, port = sys.argv[1:]
count, index = int(count), int(index)
if count > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=count,
                               process_id=index)
from configs.demo import get_config
from flipjax.data.pipeline import make_train_dataset, to_global
from flipjax.data.tokenizer import Tokenizer
from flipjax.train.sharding import make_mesh
from flipjax.train.step import TrainSetup

config = get_config("tiny")
config.data.data_dir, config.tokenizer.path = data_dir, tok_path
config.loss_impl = "sharded"
config.model.image.depth = config.model.text.depth = 1
tok = Tokenizer(tok_path, config.tokenizer.max_len)
setup = TrainSetup(config, tok.vocab_size, make_mesh(config.mesh))
it = iter(make_train_dataset(config.data, tok, seed=config.seed))
state, rows = setup.init(), []
for _ in range(3):
    batch = to_global(next(it), setup.batch_sharding)
    fingerprint = jax.jit(lambda x: x.astype(np.float32).sum(axis=(1, 2, 3)),
                          out_shardings=jax.sharding.NamedSharding(setup.mesh, jax.P()))
    state, m = setup.train_step(state, batch)
    rows.append({"loss": float(m["loss"]), "images": fingerprint(batch["image"]).tolist()})
assert jax.device_count() == 8 and jax.process_count() == count
if index == 0:
    json.dump(rows, open(out, "w"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(tmp_path, tiny_data, count):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    out, port = tmp_path / f"out{count}.json", free_port()
    flags = f"--xla_force_host_platform_device_count={8 // count}"
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    procs, logs = [], []
    for index in range(count):
        logs.append(tmp_path / f"log{count}_{index}")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(script), *tiny_data, str(out), str(count), str(index),
                 str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    return json.loads(out.read_text())


def test_two_processes_match_one(tiny_data, tmp_path):
    one = run_workers(tmp_path, tiny_data, 1)
    two = run_workers(tmp_path, tiny_data, 2)
    for a, b in zip(one, two, strict=True):
        assert a["images"] == b["images"]  # the same records, in the same order
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
