"""Preemption (SIGTERM) saves and exits with the documented code; SIGKILL during an async save
leaves the previous checkpoint as the latest; non-finite steps never reach the parameters."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest
from conftest import REPO

from flipjax.config import ConfigError
from flipjax.data.pipeline import make_train_dataset
from flipjax.data.tokenizer import Tokenizer
from flipjax.train import checkpoint
from flipjax.train.optimizer import make_schedule
from flipjax.train.preemption import PREEMPTED_EXIT_CODE
from flipjax.train.sharding import make_mesh
from flipjax.train.step import TrainSetup
from flipjax.train.trainer import train_and_evaluate


def wait_for(predicate, proc, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen (exit code {proc.poll()})")


def test_sigterm_to_the_process_group_saves_current_step_and_exits(tiny_data, tmp_path):
    """As a VM shutdown delivers it: to every process, Grain's input workers included, which
    must keep feeding the main process until it has saved."""
    data_dir, tokenizer_path = tiny_data
    workdir, log_path = tmp_path / "run", tmp_path / "run.log"
    cmd = [sys.executable, "-m", "flipjax.main", "--config=configs/demo.py:tiny",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
           f"--config.tokenizer.path={tokenizer_path}", "--config.total_steps=1000",
           "--config.checkpoint.every_steps=1000", "--config.model.image.depth=1",
           "--config.model.text.depth=1", "--config.data.num_workers=2"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    metrics_path = workdir / "metrics.jsonl"
    wait_for(lambda: metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= 3,
             proc, "three logged steps")
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE, log_path.read_text()[-3000:]
    assert "preempted: saved a checkpoint at step" in log_path.read_text()
    logged = [json.loads(line)["step"] for line in metrics_path.read_text().splitlines()]
    manager = checkpoint.make_manager(str(workdir), ml_collections.ConfigDict(
        dict(keep=2, every_steps=1000, async_save=False)))
    # The step it stopped at, though no periodic save was due before step 1000.
    assert manager.all_steps() == [logged[-1]] and 3 <= logged[-1] < 1000
    manager.close()


def test_input_workers_outlive_a_sigterm(tiny_config):
    """A SIGTERM that reaches Grain's workers (a VM shutdown signals every process) leaves the
    batches coming: the trainer saves after the notice, and a data-bound run's buffer is
    empty then, so it needs its workers alive."""
    import multiprocessing

    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain reads its flags when it starts workers
        flags.FLAGS.mark_as_parsed()
    tiny_config.data.num_workers = 2
    tokenizer = Tokenizer(tiny_config.tokenizer.path, tiny_config.tokenizer.max_len)
    before = {p.pid for p in multiprocessing.active_children()}
    batches = iter(make_train_dataset(tiny_config.data, tokenizer, seed=0))
    for _ in range(tiny_config.data.num_workers):  # batches come round-robin: each worker has
        next(batches)  # started, its set-up done (a worker still starting dies of SIGTERM)
    workers = [p for p in multiprocessing.active_children() if p.pid not in before]
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(1)
    for _ in range(4 * tiny_config.data.prefetch_batches + 4):  # past what the buffers held
        assert next(batches)["image"].shape[0] == tiny_config.data.global_batch_size
    assert all(worker.is_alive() for worker in workers)



TRAINER_WITH_WORKERS = """
import json, multiprocessing, sys, time
from absl import flags
from configs.demo import get_config
from flipjax.data.pipeline import make_train_dataset
from flipjax.data.tokenizer import Tokenizer

flags.FLAGS.mark_as_parsed()  # Grain reads its flags when it starts workers
config = get_config("tiny")
config.data.data_dir, config.tokenizer.path = sys.argv[1], sys.argv[2]
config.data.num_workers = 2
tokenizer = Tokenizer(config.tokenizer.path, config.tokenizer.max_len)
batches = iter(make_train_dataset(config.data, tokenizer, seed=0))
for _ in range(config.data.num_workers):
    next(batches)
print(json.dumps([p.pid for p in multiprocessing.active_children()]), flush=True)
time.sleep(3600)
"""


def running(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_input_workers_exit_when_the_trainer_is_killed(tiny_data):
    """A trainer killed outright (SIGKILL, the OOM killer) cannot stop Grain's workers, which
    ignore SIGTERM: they used to stay blocked on their full queues, holding memory, forever."""
    proc = subprocess.Popen([sys.executable, "-c", TRAINER_WITH_WORKERS, *tiny_data], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    workers = json.loads(proc.stdout.readline())
    assert len(workers) == 2 and all(map(running, workers))
    proc.kill()
    proc.wait()
    deadline = time.time() + 30
    while any(map(running, workers)) and time.time() < deadline:
        time.sleep(0.1)
    orphans = list(filter(running, workers))
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    assert not orphans

CHILD = """
import asyncio, os, sys
import grain, jax.numpy as jnp, ml_collections
from orbax.checkpoint._src.path import atomicity
from flipjax.train import checkpoint

workdir, marker = sys.argv[1], sys.argv[2]
manager = checkpoint.make_manager(workdir, ml_collections.ConfigDict(
    dict(keep=3, every_steps=1, async_save=True)))
it = iter(grain.MapDataset.range(10).to_iter_dataset())
checkpoint.save(manager, 1, {"w": jnp.ones(4)}, it)
manager.wait_until_finished()

async def stuck_finalize(self):  # data written, commit (rename) never happens
    open(marker, "w").close()
    await asyncio.sleep(3600)

atomicity.AtomicRenameTemporaryPath.finalize = stuck_finalize
next(it)
checkpoint.save(manager, 2, {"w": jnp.full(4, 2.0)}, it)
manager.wait_until_finished()
"""


def test_sigkill_during_async_save_keeps_previous_checkpoint(tmp_path):
    script, marker, log_path = tmp_path / "child.py", tmp_path / "writing", tmp_path / "log"
    script.write_text(textwrap.dedent(CHILD))
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(script), str(workdir), str(marker)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(marker.exists, proc, "the second save reaching its commit")
    except AssertionError:
        raise AssertionError(log_path.read_text()[-3000:]) from None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p.name for p in (workdir / "checkpoints").iterdir()]
    assert any(name.startswith("2.orbax-checkpoint-tmp") for name in leftovers), leftovers

    manager = checkpoint.make_manager(str(workdir), ml_collections.ConfigDict(
        dict(keep=3, every_steps=1, async_save=True)))
    assert manager.latest_step() == 1 and manager.all_steps() == [1]
    abstract = {"w": jax.ShapeDtypeStruct((4,), np.float32)}
    restored = checkpoint.restore(manager, 1, abstract, None)
    np.testing.assert_array_equal(restored["w"], np.ones(4))
    manager.close()


def diverging(config, mode):
    """exp(t) = 1e38: the loss is finite but its gradient overflows on the first step."""
    config.model.temperature_init, config.model.max_temperature = 1e38, None
    config.nonfinite = mode
    config.total_steps, config.checkpoint.every_steps = 3, 1
    config.evals = ml_collections.ConfigDict()
    config.model.image.depth = config.model.text.depth = 1  # compiles faster
    return config


def test_nonfinite_raise_stops_before_saving(tiny_config, tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 1"):
        train_and_evaluate(diverging(tiny_config, "raise"), str(tmp_path))
    assert not os.listdir(tmp_path / "checkpoints")


def test_nonfinite_skip_keeps_params_and_counts(tiny_config, tmp_path):
    config = diverging(tiny_config, "skip")
    metrics = train_and_evaluate(config, str(tmp_path))
    assert metrics["train/nonfinite_steps"] == 3
    manager = checkpoint.make_manager(str(tmp_path), config.checkpoint)
    setup = TrainSetup(config, 200, make_mesh(config.mesh))
    abstract = checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
    state = checkpoint.restore(manager, 3, abstract, None)
    manager.close()
    assert int(state["step"]) == 3 and int(state["nonfinite_steps"]) == 3
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state["params"])))
    np.testing.assert_allclose(state["params"]["t"], np.log(np.float32(1e38)), rtol=1e-6)
    # No update was applied, so the optimizer's schedule never advanced: every step logs the
    # rate of step 0, not the warmup's rising values.
    schedule = make_schedule(config.optim, config.total_steps)
    assert schedule(2) > schedule(0)
    logged = [json.loads(line)["train/lr"] for line in open(tmp_path / "metrics.jsonl")]
    np.testing.assert_allclose(logged, [schedule(0)] * 3)


def test_raise_resumes_past_nonfinite_steps_its_checkpoint_counts(tiny_config, tmp_path):
    """A checkpoint counting a skipped step (a "skip" run, or a preemption save before the
    check) resumes under nonfinite="raise": only new non-finite steps stop training."""
    config = tiny_config
    config.total_steps, config.checkpoint.every_steps = 3, 1
    config.evals = ml_collections.ConfigDict()
    config.model.image.depth = config.model.text.depth = 1
    tokenizer = Tokenizer(config.tokenizer.path, config.tokenizer.max_len)
    setup = TrainSetup(config, tokenizer.vocab_size, make_mesh(config.mesh))
    state = setup.init()
    state["step"] = state["step"] + 1
    state["nonfinite_steps"] = state["nonfinite_steps"] + 1
    data_iter = iter(make_train_dataset(config.data, tokenizer, seed=config.seed))
    next(data_iter)
    manager = checkpoint.make_manager(str(tmp_path), config.checkpoint)
    checkpoint.save(manager, 1, state, data_iter)
    manager.wait_until_finished()
    manager.close()
    metrics = train_and_evaluate(config, str(tmp_path))
    assert metrics["train/nonfinite_steps"] == 1 and np.isfinite(metrics["train/loss"])


def test_resume_with_another_layer_layout_fails_clearly_and_keeps_config(tiny_config, tmp_path):
    """A checkpoint of unrolled layers does not fit a scanned model: the resume is refused
    naming the field before anything restores, and config.json still describes the
    checkpoint."""
    config = tiny_config
    config.total_steps = 1
    config.evals = {}
    train_and_evaluate(config, str(tmp_path))
    saved = (tmp_path / "config.json").read_text()
    config.total_steps = 2
    config.model.scan_layers = True
    with pytest.raises(ConfigError, match=r"^config\.model\.scan_layers: True differs from "
                                          r"False in .*config\.json"):
        train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == saved


def test_a_damaged_data_position_is_not_called_a_config_mismatch(tmp_path):
    """The state and the data position restore on their own: a state of other shapes is a
    ConfigError naming the fields that decide them, a damaged iterator file raises as it is."""
    import grain
    import jax.numpy as jnp

    manager = checkpoint.make_manager(str(tmp_path), ml_collections.ConfigDict(
        dict(keep=2, every_steps=1, async_save=False)))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    saved_iter = iter(grain.MapDataset.range(10).to_iter_dataset())
    next(saved_iter)
    checkpoint.save(manager, 1, {"w": jnp.ones(4)}, saved_iter)
    manager.wait_until_finished()

    def abstract(size):
        return {"w": jax.ShapeDtypeStruct((size,), jnp.float32, sharding=sharding)}

    def fresh():
        return iter(grain.MapDataset.range(10).to_iter_dataset())

    resumed = fresh()
    np.testing.assert_array_equal(checkpoint.restore(manager, 1, abstract(4), resumed)["w"], 1)
    assert next(resumed) == 1
    with pytest.raises(ConfigError, match="does not fit this config's train state"):
        checkpoint.restore(manager, 1, abstract(5), fresh())
    for state_file in (tmp_path / "checkpoints" / "1" / "iter").glob("process_*"):
        state_file.write_text("{cut off")
    with pytest.raises(Exception) as raised:
        checkpoint.restore(manager, 1, abstract(4), fresh())
    assert not isinstance(raised.value, ConfigError), raised.value
    manager.close()
