"""Two processes with 4 CPU devices each (jax.distributed on localhost) train to the same
losses as one process with 8 devices, step for step, through a preemption and a resume (the
sharded loss's collectives and the global batches assembled from each process's rows)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
from conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main_command(workdir, tiny_data, extra=()):
    data_dir, tok_path = tiny_data
    return [sys.executable, "-m", "flipjax.main", "--config=configs/demo.py:tiny",
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            f"--config.tokenizer.path={tok_path}", "--config.total_steps=40",
            "--config.loss_impl=sharded",
            "--config.log_every_steps=1", "--config.checkpoint.every_steps=1000", *extra]


def start_main(workdir, tiny_data, count, port, tag, config_args=()):
    flags = f"--xla_force_host_platform_device_count={8 // count}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    procs = []
    for index in range(count):
        extra = list(config_args) + ([] if count == 1 else
                                     ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
                                      f"--num_processes={count}", f"--process_id={index}"])
        with open(f"{workdir}.{tag}{index}.log", "w") as log:
            procs.append(subprocess.Popen(main_command(workdir, tiny_data, extra), cwd=REPO,
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def logged_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.endswith("\n")]  # complete lines
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_two_process_main_preempted_then_resumed_matches_one_process(tiny_data, tmp_path):
    """`flipjax.main --distributed` on two processes: SIGTERM makes both save the same step
    (JAX's preemption sync point) and exit 143; the same commands resume from that checkpoint,
    with each process's data-iterator state, and log the losses of an uninterrupted
    single-process run."""
    ref = str(tmp_path / "one")
    (proc,) = start_main(ref, tiny_data, 1, None, "run")
    assert proc.wait(timeout=600) == 0, open(f"{ref}.run0.log").read()[-3000:]
    expected = logged_losses(ref)

    two, port = str(tmp_path / "two"), free_port()
    procs = start_main(two, tiny_data, 2, port, "first")
    deadline = time.time() + 600
    while not (os.path.exists(os.path.join(two, "metrics.jsonl"))
               and logged_losses(two)) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), open(f"{two}.first0.log").read()[-3000:]
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [143, 143], open(f"{two}.first0.log").read()[-3000:]
    saved = sorted(int(d) for d in os.listdir(os.path.join(two, "checkpoints")) if d.isdigit())
    assert len(saved) == 1 and 1 <= saved[0] < 40, saved

    procs = start_main(two, tiny_data, 2, free_port(), "resume")
    assert [p.wait(timeout=600) for p in procs] == [0, 0], \
        open(f"{two}.resume0.log").read()[-3000:]
    assert "resumed from step" in open(f"{two}.resume0.log").read()
    got = logged_losses(two)
    assert sorted(got) == sorted(expected) == list(range(1, 41))
    np.testing.assert_allclose([got[s] for s in range(1, 41)],
                               [expected[s] for s in range(1, 41)], rtol=1e-5)


PREEMPTION_WORKER = """
import json, os, signal, sys, time
import jax
from jax.experimental import multihost_utils

index, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=index)
from flipjax.train.preemption import PreemptionWatch

watch = PreemptionWatch(100)  # a run resuming from step 100, as soon as it knows
os.kill(os.getpid(), signal.SIGTERM)  # the notice, while it restores: JAX's service catches it
multihost_utils.sync_global_devices("noticed")
time.sleep(1)
agreed = []
with watch:
    for step in range(101, 111):
        multihost_utils.sync_global_devices(f"step {step}")  # as a train step's collectives
        time.sleep(0.2)
        if watch.reached(step):
            agreed.append(step)
json.dump(agreed, open(out, "w"))
"""


def test_a_notice_before_a_resumed_runs_first_step_is_agreed_on(tmp_path):
    """Two processes resumed from step 100 get SIGTERM before their first step (during the
    restore or the resumed step's evaluations): both agree to stop at step 101. (JAX's service
    agreed on step 1, which a resumed run never reaches: it trained on.)"""
    script, port = tmp_path / "preempt.py", free_port()
    script.write_text(textwrap.dedent(PREEMPTION_WORKER))
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port),
                               str(tmp_path / f"agreed{i}.json")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stdout.read()[-3000:]
    assert [json.loads((tmp_path / f"agreed{i}.json").read_text()) for i in range(2)] == \
        [[101], [101]]


def test_a_failure_of_process_0s_writes_stops_every_process(tiny_data, tmp_path):
    """Only process 0 builds missing data and reads and writes the run's files; when that
    fails the others learn it and exit instead of waiting for it in a collective."""
    workdir = str(tmp_path / "run")
    procs = start_main(workdir, tiny_data, 2, free_port(), "prep", [
        "--config.data.build_if_missing=True", "--config.data.name=no_such_dataset"])
    codes = [p.wait(timeout=300) for p in procs]
    log1 = open(f"{workdir}.prep1.log").read()
    assert all(code not in (0, None) for code in codes), codes
    assert "process 0 failed to build the dataset or train the tokenizer" in log1, log1[-3000:]

    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write("not json\n")
    procs = start_main(workdir, tiny_data, 2, free_port(), "metrics")
    codes = [p.wait(timeout=300) for p in procs]
    log0, log1 = (open(f"{workdir}.metrics{i}.log").read() for i in range(2))
    assert all(code not in (0, None) for code in codes), codes
    assert "metrics.jsonl:1: not a metrics line" in log0, log0[-3000:]
    assert "process 0 failed to read metrics.jsonl" in log1, log1[-3000:]
