"""End-to-end training: the loss falls, checkpoints restore exactly, and a SIGKILLed run
resumes to the same per-step losses as an uninterrupted one."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO

from flipjax.config import ConfigError
from flipjax.data.pipeline import make_train_dataset, to_global
from flipjax.data.tokenizer import Tokenizer, train_sentencepiece
from flipjax.train import checkpoint
from flipjax.train.sharding import make_mesh
from flipjax.train.step import TrainSetup
from flipjax.train.trainer import train_and_evaluate


def read_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.endswith("\n")]  # complete lines
    return {r["step"]: r["train/loss"] for r in rows}, rows


def test_training_lowers_loss_and_beats_chance(tiny_config, tmp_path):
    tiny_config.total_steps = 300
    tiny_config.log_every_steps = 1
    tiny_config.checkpoint.every_steps = 300
    tiny_config.evals.retrieval.every_steps = 300
    metrics = train_and_evaluate(tiny_config, str(tmp_path))
    losses, rows = read_losses(tmp_path)
    first = np.mean([losses[s] for s in range(1, 31)])
    last = np.mean([losses[s] for s in range(271, 301)])
    assert last < first - 0.3, (first, last)  # ln(16) = 2.77 is chance
    # In-batch image->caption top-1 over the last 30 steps: chance is 1/16. (Held-out retrieval
    # on the tiny set's 64 test images is too noisy to assert on; experiments/results/demo.md
    # records it on 1,000.)
    top1 = np.mean([r["train/i2t_top1"] for r in rows if r["step"] > 270])
    assert top1 > 2 / 16, top1
    recalls = [f"retrieval/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert all(0.0 <= metrics[key] <= 100.0 for key in recalls), metrics
    assert rows[-1]["step"] == 300 and "train/images_per_s" in rows[-1]
    assert os.path.isdir(tmp_path / "tensorboard")


def test_evals_run_at_their_own_interval(tiny_config, tmp_path):
    """An eval interval that is no multiple of the logging interval still runs (and logs)."""
    tiny_config.total_steps, tiny_config.log_every_steps = 7, 2
    tiny_config.checkpoint.every_steps = 100
    tiny_config.evals = {"retrieval": {**tiny_config.evals.retrieval, "every_steps": 3}}
    tiny_config.model.image.depth = tiny_config.model.text.depth = 1
    train_and_evaluate(tiny_config, str(tmp_path))
    _, rows = read_losses(tmp_path)
    assert [r["step"] for r in rows] == [2, 3, 4, 6, 7]
    assert [r["step"] for r in rows if "retrieval/i2t_R@1" in r] == [3, 6, 7]


def test_resume_with_another_batch_size_or_build_fails_clearly(tiny_config, tmp_path):
    """The iterator's checkpoint counts batches: resumed with twice the batch it would skip
    half an epoch of records without a word, and on a rebuilt dataset other records."""
    tiny_config.total_steps, tiny_config.checkpoint.every_steps = 2, 2
    tiny_config.evals = {}
    tiny_config.model.image.depth = tiny_config.model.text.depth = 1
    train_and_evaluate(tiny_config, str(tmp_path))
    batch = tiny_config.data.global_batch_size
    tiny_config.data.global_batch_size, tiny_config.total_steps = 2 * batch, 4
    with pytest.raises(ConfigError, match=rf"config\.data\.global_batch_size: {2 * batch} "
                                          rf"differs from {batch} in .*config\.json"):
        train_and_evaluate(tiny_config, str(tmp_path))
    # Grain's state is per worker process and per host: it restores only into as many.
    tiny_config.data.global_batch_size, tiny_config.data.num_workers = batch, 2
    with pytest.raises(ConfigError, match=r"config\.data\.num_workers: 2 differs from 0"):
        train_and_evaluate(tiny_config, str(tmp_path))
    # The same build elsewhere resumes; a rebuilt one (here: other bytes in the train split)
    # is refused, naming the field that points at it.
    tiny_config.data.num_workers = 0
    moved = shutil.copytree(tiny_config.data.data_dir, tmp_path / "moved_data")
    tiny_config.data.data_dir = str(moved)
    (info_path,) = moved.glob("synthetic_faces/tiny/*/dataset_info.json")
    info = json.loads(info_path.read_text())
    (train_info,) = (split for split in info["splits"] if split["name"] == "train")
    train_info["numBytes"] = str(int(train_info["numBytes"]) + 1)
    info_path.write_text(json.dumps(info))
    with pytest.raises(ConfigError, match=r"^config\.data\.data_dir: .*moved_data' holds "
                                          r"synthetic_faces/tiny .*another build"):
        train_and_evaluate(tiny_config, str(tmp_path))
    train_info["numBytes"] = str(int(train_info["numBytes"]) - 1)
    info_path.write_text(json.dumps(info))
    tiny_config.total_steps = 3
    train_and_evaluate(tiny_config, str(tmp_path))
    manager = checkpoint.make_manager(str(tmp_path), tiny_config.checkpoint)
    assert manager.latest_step() == 3
    checkpoint.check_same_processes(manager, 2)
    iter_dir = tmp_path / "checkpoints" / "2" / "iter"
    (iter_dir / "process_0-of-1.json").rename(iter_dir / "process_0-of-2.json")
    with pytest.raises(ConfigError, match=r"saved by 2 process\(es\) \(process_0-of-2\.json"):
        checkpoint.check_same_processes(manager, 2)
    manager.close()


def test_a_failing_evaluation_loses_no_training_and_the_tokenizer_stays_the_runs(
        tiny_config, tmp_path, monkeypatch):
    """The step's checkpoint is saved before its evaluations run; the workdir keeps the run's
    tokenizer, which a resume must use; a finished run started again changes nothing."""
    from flipjax.evaluate.retrieval import RetrievalEvaluator
    from flipjax.train.workdir import TOKENIZER_FILE, tokenizer_path

    config, workdir = tiny_config, str(tmp_path / "work")
    config.total_steps, config.checkpoint.every_steps = 2, 2
    config.evals = {"retrieval": {**config.evals.retrieval, "every_steps": 2}}
    config.model.image.depth = config.model.text.depth = 1

    def fail(self, params, step=None):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(RetrievalEvaluator, "run", fail)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train_and_evaluate(config, workdir)
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    assert manager.all_steps() == [2]
    manager.close()
    losses, _ = read_losses(workdir)
    assert sorted(losses) == [1, 2]  # the step's training metrics are logged all the same
    kept = tmp_path / "work" / TOKENIZER_FILE
    assert kept.read_bytes() == open(config.tokenizer.path, "rb").read()
    assert tokenizer_path(config, workdir) == str(kept)

    # Started again, it evaluates the step again, best effort: failing again is logged.
    assert train_and_evaluate(config, workdir) == {}
    assert "retrieval/t2i_R@1" not in read_losses(workdir)[1][1]
    monkeypatch.undo()
    saved = (tmp_path / "work" / "config.json").read_text()
    config.optim.lr = 1.0  # forgot to change --workdir: the finished run is left as it was,
    assert train_and_evaluate(config, workdir) == {}  # not evaluated with another's config
    assert (tmp_path / "work" / "config.json").read_text() == saved
    assert "retrieval/t2i_R@1" not in read_losses(workdir)[1][1]
    config.optim.lr = json.loads(saved)["optim"]["lr"]  # its own config completes it
    assert train_and_evaluate(config, workdir) == {}
    _, rows = read_losses(workdir)
    assert [r["step"] for r in rows] == [1, 2] and "retrieval/t2i_R@1" in rows[1]
    assert rows[1]["train/loss"] == losses[2]

    other = train_sentencepiece([f"a face number {i} with words" for i in range(300)],
                                str(tmp_path / "other.model"), 60)
    config.tokenizer.path, config.total_steps = other, 4
    with pytest.raises(ConfigError, match=r"config\.tokenizer\.path: .* is not the tokenizer "
                                          r"this run trained with"):
        train_and_evaluate(config, workdir)


def test_a_resumed_run_evaluates_what_its_checkpointed_step_did_not(tiny_config, tmp_path,
                                                                    monkeypatch):
    """An evaluator failing after its step's checkpoint: the line keeps the results of those
    that ran before it; the resumed run evaluates the missing ones at that step, in that
    step's line (a preemption notice stops it between two, the step being saved), then
    trains on."""
    from flipjax.evaluate.retrieval import RetrievalEvaluator
    from flipjax.evaluate.zeroshot import ZeroShotAttributesEvaluator
    from flipjax.train.preemption import PreemptedError

    config, workdir = tiny_config, str(tmp_path)
    config.total_steps, config.checkpoint.every_steps = 4, 2
    zeroshot = {**config.evals.zeroshot, "every_steps": 2}
    config.evals = {"retrieval": {**config.evals.retrieval, "every_steps": 2},
                    "zeroshot": zeroshot, "zeroshot_again": zeroshot}
    config.model.image.depth = config.model.text.depth = 1
    runs = []

    def recorded(name, run, after=lambda: None):
        def record_and_run(self, params, step=None):
            runs.append((name, step))
            results = run(self, params, step)
            after()
            return results
        return record_and_run

    def stops_at_step_2(error, match, logged_key, missing_prefix):
        with pytest.raises(error, match=match):
            train_and_evaluate(config, workdir)
        _, rows = read_losses(workdir)
        assert [r["step"] for r in rows] == [1, 2] and logged_key in rows[1]
        assert not any(k.startswith(missing_prefix) for k in rows[1])

    def zeroshot_fails(self, params, step=None):
        raise RuntimeError("zero-shot failed")

    zeroshot_run = ZeroShotAttributesEvaluator.run
    monkeypatch.setattr(RetrievalEvaluator, "run",
                        recorded("retrieval", RetrievalEvaluator.run))
    monkeypatch.setattr(ZeroShotAttributesEvaluator, "run", zeroshot_fails)
    stops_at_step_2(RuntimeError, "zero-shot failed", "retrieval/t2i_R@1", "zeroshot")

    # The notice arrives as it finishes (one during its batches stops it there, tested below).
    monkeypatch.setattr(ZeroShotAttributesEvaluator, "run", recorded(
        "zeroshot", zeroshot_run, lambda: os.kill(os.getpid(), signal.SIGTERM)))
    stops_at_step_2(PreemptedError, "saved a checkpoint at step 2", "zeroshot/mean_acc",
                    "zeroshot_again/")

    monkeypatch.setattr(ZeroShotAttributesEvaluator, "run", recorded("zeroshot", zeroshot_run))
    train_and_evaluate(config, workdir)
    assert runs == [("retrieval", 2), ("zeroshot", 2), ("zeroshot", 2), ("retrieval", 4),
                    ("zeroshot", 4), ("zeroshot", 4)]
    losses, rows = read_losses(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in (rows[1], rows[3]):
        assert {"train/loss", "retrieval/t2i_R@1", "zeroshot/mean_acc",
                "zeroshot_again/mean_acc"} <= set(row)


def test_a_notice_stops_evaluations_at_their_step_and_a_trained_step_before_evaluating(
        tiny_config, tmp_path, monkeypatch):
    """Evaluations find their step's training line already written (a run killed while
    evaluating keeps it). A notice while one runs stops it at its next batch and saves its
    step (one evaluator can outlast a grace period), also when a resumed run evaluates what
    it missed; one while a step trains makes that step save and stop without evaluating
    (the grace period is the save's), at the last step too; one while the run sets up
    (builds data, restores) stops it there. Started again, the run evaluates what it missed,
    in the lines of those steps."""
    import flipjax.train.trainer as trainer
    from flipjax.evaluate.retrieval import RetrievalEvaluator
    from flipjax.train.preemption import PreemptedError

    config, workdir = tiny_config, str(tmp_path)
    config.total_steps, config.checkpoint.every_steps = 2, 2
    config.evals = {"retrieval": {**config.evals.retrieval, "every_steps": 1},
                    "retrieval_again": {**config.evals.retrieval, "every_steps": 1}}
    config.model.image.depth = config.model.text.depth = 1
    logged_when_evaluated = []
    evaluate = RetrievalEvaluator.run

    def notice_while_the_second_evaluates(self, params, step=None):
        logged_when_evaluated.append(read_losses(workdir)[0].get(step))
        if len(logged_when_evaluated) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, params, step)

    def notice_while_evaluating(self, params, step=None):
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, params, step)

    def notice_during(fn):
        return lambda *args: (os.kill(os.getpid(), signal.SIGTERM), fn(*args))[1]

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "prepare", notice_during(trainer.prepare))
        with pytest.raises(PreemptedError, match="preempted: before its first step"):
            train_and_evaluate(config, workdir)
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))

    monkeypatch.setattr(RetrievalEvaluator, "run", notice_while_the_second_evaluates)
    with pytest.raises(PreemptedError, match="saved a checkpoint at step 1"):
        train_and_evaluate(config, workdir)
    losses, rows = read_losses(workdir)
    assert logged_when_evaluated == [losses[1], losses[1]]
    assert "retrieval/t2i_R@1" in rows[0] and "retrieval_again/t2i_R@1" not in rows[0]
    with monkeypatch.context() as patch:
        patch.setattr(trainer.checkpoint, "restore", notice_during(trainer.checkpoint.restore))
        with pytest.raises(PreemptedError, match="saved a checkpoint at step 1"):
            train_and_evaluate(config, workdir)
    assert read_losses(workdir)[1] == rows  # neither trained nor evaluated
    monkeypatch.setattr(RetrievalEvaluator, "run", notice_while_evaluating)
    with pytest.raises(PreemptedError, match="saved a checkpoint at step 1"):
        train_and_evaluate(config, workdir)  # stops the evaluation it resumed with
    assert read_losses(workdir)[1] == rows

    monkeypatch.setattr(RetrievalEvaluator, "run", evaluate)
    monkeypatch.setattr(trainer, "to_global", notice_during(trainer.to_global))  # step 2
    with pytest.raises(PreemptedError, match="saved a checkpoint at step 2"):
        train_and_evaluate(config, workdir)
    rows = read_losses(workdir)[1]
    assert "retrieval_again/t2i_R@1" in rows[0]  # step 1's, evaluated on resuming
    assert not any(k.startswith("retrieval") for k in rows[1])
    monkeypatch.undo()
    assert train_and_evaluate(config, workdir) == {}
    assert {"retrieval/t2i_R@1", "retrieval_again/t2i_R@1"} <= set(read_losses(workdir)[1][1])


def test_a_preempted_step_off_the_logging_interval_leaves_the_lines_of_an_uninterrupted_run(
        tiny_config, tmp_path, monkeypatch):
    """Preempted at step 3 of 4 (lines every 2 steps), the run saves step 3 without a line of
    its own, and resumed it logs the lines and losses of a run never stopped."""
    from flipjax.train.preemption import PreemptedError, PreemptionWatch

    config = tiny_config
    config.total_steps, config.log_every_steps, config.checkpoint.every_steps = 4, 2, 4
    config.evals = {}
    config.model.image.depth = config.model.text.depth = 1
    stopped, whole = str(tmp_path / "stopped"), str(tmp_path / "whole")
    monkeypatch.setattr(PreemptionWatch, "reached", lambda self, step: step == 3)
    with pytest.raises(PreemptedError, match="saved a checkpoint at step 3"):
        train_and_evaluate(config, stopped)
    assert list(read_losses(stopped)[0]) == [2]
    monkeypatch.undo()
    train_and_evaluate(config, stopped)
    train_and_evaluate(config, whole)
    (losses, rows), (expected, expected_rows) = read_losses(stopped), read_losses(whole)
    assert [r["step"] for r in rows] == [r["step"] for r in expected_rows] == [2, 4]
    np.testing.assert_allclose(list(losses.values()), list(expected.values()), rtol=1e-6)


def test_a_resume_that_lowers_the_temperature_cap_holds_it_from_its_first_step(
        tiny_config, tmp_path):
    """The cap is clamped after each update; a resume with a lower one (a field a resume may
    change) clamps the restored temperature before its first step too."""
    config = tiny_config
    config.total_steps, config.checkpoint.every_steps, config.evals = 2, 2, {}
    config.model.image.depth = config.model.text.depth = 1
    config.model.temperature_init = 10.0
    train_and_evaluate(config, str(tmp_path))
    config.total_steps, config.model.max_temperature = 3, 5.0
    config.model.temperature_init = 5.0  # what a fresh run would start from under the cap
    train_and_evaluate(config, str(tmp_path))
    rows = read_losses(tmp_path)[1]
    assert rows[1]["train/temperature"] > 9.9 and rows[2]["train/temperature"] <= 5.0 + 1e-5


def test_a_resume_that_would_compute_another_model_is_refused(tiny_config, tmp_path):
    """Another GELU (or eps, or input mean) restores into the same shapes: the resume is
    refused naming the field, and the run's config.json still describes its checkpoints."""
    config = tiny_config
    config.total_steps, config.checkpoint.every_steps, config.evals = 1, 1, {}
    config.model.image.depth = config.model.text.depth = 1
    train_and_evaluate(config, str(tmp_path))
    saved = (tmp_path / "config.json").read_text()
    config.total_steps, config.model.gelu = 2, "quick"
    with pytest.raises(ConfigError, match=r"^config\.model\.gelu: 'quick' differs from 'tanh'"):
        train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == saved

    # A workdir from before runs kept their tokenizer takes the resume's, once its
    # checkpoint has restored: one that does not fit it (another vocabulary) keeps none.
    config.model.gelu = "tanh"
    (tmp_path / "tokenizer.model").unlink()
    config.tokenizer.path = train_sentencepiece(
        [f"a face number {i} with words" for i in range(300)], str(tmp_path / "o.model"), 60)
    with pytest.raises(Exception):  # noqa: B017 - Orbax's, about the embedding's shape
        train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "tokenizer.model").exists()


def test_cached_features_go_with_their_checkpoints(tiny_config, tmp_path):
    """Evaluations cache a split's features per step; once a step's checkpoint is gone (keep=1)
    its features are too."""
    config = tiny_config
    config.total_steps, config.checkpoint.every_steps, config.checkpoint.keep = 4, 2, 1
    config.evals = {"zeroshot": {**config.evals.zeroshot, "every_steps": 2}}
    config.model.image.depth = config.model.text.depth = 1
    train_and_evaluate(config, str(tmp_path))
    cached = sorted(p.name for p in (tmp_path / "features").iterdir())
    assert len(cached) == 1 and "_step4_" in cached[0], cached


@pytest.mark.parametrize("accum", [1, 2])
def test_a_frozen_tower_is_left_as_is_and_out_of_the_backward_pass(tiny_config, accum):
    """LiT-style: with the image tower frozen it keeps its weights, its backward pass is not
    compiled (fewer matmuls), and the gradient norm is the trained parameters' alone."""
    config, mesh = tiny_config, make_mesh(tiny_config.mesh)
    config.grad_accum_steps = accum
    tok = Tokenizer(config.tokenizer.path, config.tokenizer.max_len)
    batch = next(iter(make_train_dataset(config.data, tok, seed=0)))

    def one_step(frozen_regex):
        config.optim.frozen_regex = frozen_regex
        config.optim.warmup_steps = 0  # a learning rate above 0 at the first step
        setup = TrainSetup(config, tok.vocab_size, mesh)
        state = setup.init()
        before = jax.device_get(state["params"])
        batch_on_mesh = to_global(batch, setup.batch_sharding)
        hlo = setup.train_step.lower(state, batch_on_mesh).compile().as_text()
        state, metrics = setup.train_step(state, batch_on_mesh)
        return before, jax.device_get(state["params"]), metrics, hlo.count(" dot(")

    before, after, metrics, dots = one_step("img/.*")
    for a, b in zip(jax.tree.leaves(before["img"]), jax.tree.leaves(after["img"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(before["txt"]["pos_embedding"], after["txt"]["pos_embedding"])
    _, _, all_metrics, all_dots = one_step("")
    assert dots < all_dots, (dots, all_dots)
    assert float(metrics["grad_norm"]) < float(all_metrics["grad_norm"])


def test_restore_gives_identical_next_batches_and_losses(tiny_config, tmp_path):
    config = tiny_config
    mesh = make_mesh(config.mesh)
    tok = Tokenizer(config.tokenizer.path, config.tokenizer.max_len)

    def fresh():
        setup = TrainSetup(config, tok.vocab_size, mesh)
        return setup, iter(make_train_dataset(config.data, tok, seed=config.seed))

    setup, it = fresh()
    state = setup.init()
    manager = checkpoint.make_manager(str(tmp_path), config.checkpoint)
    for _ in range(5):
        state, _ = setup.train_step(state, to_global(next(it), setup.batch_sharding))
    checkpoint.save(manager, 5, state, it)
    manager.wait_until_finished()
    expected_batches, expected_losses = [], []
    for _ in range(3):
        batch = next(it)
        expected_batches.append(batch)
        state, m = setup.train_step(state, to_global(batch, setup.batch_sharding))
        expected_losses.append(float(m["loss"]))

    setup2, it2 = fresh()
    abstract = checkpoint.abstract_with_shardings(setup2.abstract_state, setup2.state_shardings)
    state2 = checkpoint.restore(manager, manager.latest_step(), abstract, it2)
    assert int(state2["step"]) == 5
    for batch, loss in zip(expected_batches, expected_losses, strict=True):
        got = next(it2)
        np.testing.assert_array_equal(got["image"], batch["image"])
        np.testing.assert_array_equal(got["text"], batch["text"])
        state2, m = setup2.train_step(state2, to_global(got, setup2.batch_sharding))
        assert float(m["loss"]) == loss
    manager.close()


def run_main(workdir, data_dir, tokenizer_path):
    cmd = [sys.executable, "-m", "flipjax.main", "--config=configs/demo.py:tiny",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
           f"--config.tokenizer.path={tokenizer_path}", "--config.total_steps=40",
           "--config.checkpoint.every_steps=5"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    log = open(f"{workdir}.log", "a")  # noqa: SIM115 - a file, not a pipe, so it never blocks
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def log_tail(workdir):
    with open(f"{workdir}.log") as f:
        return f.read()[-3000:]


def test_sigkill_resume_matches_uninterrupted_run(tiny_data, tmp_path):
    data_dir, tokenizer_path = tiny_data
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = run_main(full, data_dir, tokenizer_path)
    assert proc.wait(timeout=600) == 0, log_tail(full)
    expected, _ = read_losses(full)
    assert sorted(expected) == list(range(1, 41))

    kill_after = random.Random().randint(8, 34)
    proc = run_main(killed, data_dir, tokenizer_path)
    metrics_path = killed / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survived, _ = read_losses(killed)
    assert len(survived) < 40
    proc = run_main(killed, data_dir, tokenizer_path)
    assert proc.wait(timeout=600) == 0, log_tail(killed)
    resumed, rows = read_losses(killed)
    assert [r["step"] for r in rows] == list(range(1, 41))  # one line per step, no repeats
    assert resumed == expected, f"killed after step {kill_after}"
    assert jax.device_count() == 8
