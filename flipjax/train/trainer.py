"""The training loop: one flat function from config to trained, checkpointed, evaluated model.

Resumes from the latest checkpoint in the workdir (model, optimizer, step and the Grain
iterator), so a run killed at any point and restarted with the same command continues with
exactly the batches and losses an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from tqdm import tqdm

from flipjax.config import ConfigError, check, prepare, validate
from flipjax.data.pipeline import make_train_dataset, split_build, to_global
from flipjax.data.tokenizer import Tokenizer, same_tokenizer
from flipjax.evaluate import make_evaluators, missing_evaluations, run_evaluators
from flipjax.evaluate.features import EvaluationInterruptedError, prune_feature_cache
from flipjax.export.hf_import import load_into_params
from flipjax.storage import storage_path, write_bytes_whole
from flipjax.train import checkpoint
from flipjax.train.metrics import MetricWriter
from flipjax.train.optimizer import make_schedule
from flipjax.train.preemption import PreemptedError, PreemptionWatch
from flipjax.train.sharding import every_process, fails_together, make_mesh, process0_flag
from flipjax.train.step import TrainSetup
from flipjax.train.workdir import (
    TOKENIZER_FILE,
    TRAIN_DATA_FILE,
    check_describes_run,
    load_workdir_config,
)

# The fields a resume must keep for the checkpointed data position to hold, and why: it counts
# global batches over the seeded shuffle of one split, in one Grain state per worker process.
_RECORD_ORDER = ("the checkpoint's data position counts batches of that record order, so "
                 "resuming with another would skip or repeat records")
DATA_POSITION_FIELDS = {
    "seed": _RECORD_ORDER, "data.name": _RECORD_ORDER, "data.builder_config": _RECORD_ORDER,
    "data.train_split": _RECORD_ORDER, "data.global_batch_size": _RECORD_ORDER,
    "data.num_workers": "Grain saved one iterator state per worker process, which restores "
                        "only into as many workers",
}


def check_same_data_position(config: ml_collections.ConfigDict,
                             saved: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises ConfigError when a resumed run could not continue from its checkpoint's data
    position (it would silently skip or repeat records, or fail inside Grain); `saved` is
    the workdir's config.json."""
    for field, why in DATA_POSITION_FIELDS.items():
        keys = field.split(".")
        old, new = (functools.reduce(lambda node, key: node.get(key), keys, cfg)
                    for cfg in (saved, config))
        check(old == new, field, f"{new!r} differs from {old!r} in {workdir}/config.json: "
              f"{why}. Resume with the saved value, or use a new workdir")


def check_same_train_build(config: ml_collections.ConfigDict, build: dict,
                           workdir: str) -> None:
    """Raises ConfigError when `config.data.data_dir` holds another build of the train split
    (`build`, `split_build`'s) than the one the run's checkpoints counted batches in
    (WORKDIR/train_data.json): Grain's saved position would skip or repeat records of a
    rebuilt dataset without a word. A workdir from before runs kept the file has nothing to
    compare."""
    path = storage_path(workdir) / TRAIN_DATA_FILE
    if not path.exists():
        return
    saved = json.loads(path.read_text())

    def described(b: dict) -> str:
        parts = ", ".join(f"{name}: {sum(part['shard_lengths'])} records in "
                          f"{len(part['shard_lengths'])} shard(s), {part['num_bytes']} bytes"
                          for name, part in b["builds"].items())
        return f"{b['dataset']} {b['version']} {b['split']!r} ({parts})"

    same_everywhere = every_process(saved == build)  # hosts may each have their own copy
    check(saved == build, "data.data_dir",
          f"{config.data.data_dir!r} holds {described(build)}, another build than the run "
          f"trained on, {described(saved)} ({path}): the checkpoint's data position counts "
          "batches of those records. Point data.data_dir at that build, or use a new workdir")
    check(same_everywhere, "data.data_dir", "another process's holds another build of the "
          "train split than the run trained on (that process's error says which)")


def warn_if_schedule_changes(config: ml_collections.ConfigDict,
                             saved_config: ml_collections.ConfigDict, step: int) -> None:
    """Logs the learning-rate jump when a resume changes `total_steps`: the cosine schedule
    is stretched to the new total, so extending a finished run warms the rate back up."""
    saved = saved_config.total_steps
    if saved != config.total_steps:
        before, after = (float(make_schedule(config.optim, total)(step))
                         for total in (saved, config.total_steps))
        logging.warning("total_steps %d -> %d: the learning-rate schedule is stretched to the "
                        "new total; at step %d the rate goes from %.3g to %.3g", saved,
                        config.total_steps, step, before, after)


def check_kept_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Whether the workdir keeps a copy of the run's tokenizer; raises ConfigError when a
    resume's tokenizer is not that copy: other ids would feed the trained embeddings other
    pieces."""
    kept = storage_path(workdir) / TOKENIZER_FILE
    matches = is_kept_tokenizer(config, workdir)
    check(matches is not False, "tokenizer.path",
          f"{config.tokenizer.path!r} is not the tokenizer this run trained with ({kept}); "
          f"resume with tokenizer.path={str(kept)!r}, or use a new workdir")
    return bool(matches)


def keep_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Keeps the run's tokenizer as WORKDIR/tokenizer.model, what evaluation and export read
    (process 0 writes it)."""
    if jax.process_index() == 0:
        write_bytes_whole(storage_path(workdir) / TOKENIZER_FILE,
                          storage_path(config.tokenizer.path).read_bytes())


def is_same_run(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Whether `config` is the one the run saved as config.json (`load_workdir_config`),
    tokenizer included."""
    if not (storage_path(workdir) / "config.json").exists():
        return False
    saved = load_workdir_config(workdir)
    return (json.loads(saved.to_json()) == json.loads(config.to_json())
            and bool(is_kept_tokenizer(config, workdir)))


def is_kept_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> bool | None:
    """Whether `config.tokenizer.path` is the run's kept tokenizer (None: none kept yet)."""
    kept = storage_path(workdir) / TOKENIZER_FILE
    if not kept.exists():
        return None
    return same_tokenizer(kept.read_bytes(), storage_path(config.tokenizer.path).read_bytes())


def open_metrics(workdir: str, start: int) -> MetricWriter:
    """The run's MetricWriter from step `start` on; process 0 reads metrics.jsonl, and a line
    it cannot read stops every process."""
    with fails_together("read metrics.jsonl"):
        return MetricWriter(workdir, start)


def non_finite_message(step: int) -> str:
    return (f"non-finite loss or gradient at step {step}; that update was not applied, so the "
            "parameters and checkpoints are finite. Lower the learning rate or resume from the "
            "last checkpoint; config.nonfinite='skip' skips such steps instead")


def finish_evaluations(config: ml_collections.ConfigDict, evaluators: dict,
                       writer: MetricWriter, step: int, params: Callable[[], dict],
                       preemption: PreemptionWatch | None = None) -> None:
    """Runs the evaluations due at the checkpoint a run resumes from that its metrics line
    lacks (the run stopped while evaluating, after saving), adding each one's results to that
    line as it finishes. On one process, best effort: one failing again is logged and left to
    `python -m flipjax.evaluate`, so that it cannot keep the run from training on; and a
    preemption notice stops them at the next batch one embeds (raising PreemptedError: `step`
    is saved)."""
    missing = missing_evaluations(config.evals, step, config.total_steps,
                                  writer.logged_at_resume())
    rerun = [name for name in sorted(config.evals) if process0_flag(name in missing)]
    if not rerun:
        return
    logging.info("evaluating step %d again for %s: the run stopped before their results "
                 "were logged", step, rerun)
    params = functools.cache(params)
    for name in rerun:
        if preemption is not None and preemption.stops_now(step):
            raise PreemptedError(step)
        try:
            for results in run_evaluators(evaluators, params(), step, {name}):
                writer.amend(step, results)
        except EvaluationInterruptedError:
            raise PreemptedError(step) from None
        except Exception:  # noqa: BLE001 - whatever it was, training must not wait on it
            if jax.process_count() > 1:
                # Where it failed on some processes only, the others would wait in its
                # collectives for ever: the job fails, as it would have while training.
                raise
            logging.exception("evaluating step %d for %s failed again; going on without it",
                              step, name)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains per `config`, writing checkpoints and metrics to `workdir`; returns the final
    training and evaluation metrics.

    Raises `PreemptedError` after saving a checkpoint when a preemption notice (SIGTERM)
    arrives, and FloatingPointError on a non-finite loss when `config.nonfinite == "raise"`."""
    validate(config)
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    start = manager.latest_step() or 0
    # Watched from here, before the data is prepared and opened and the checkpoint restored
    # (minutes on a pod): a notice meanwhile stops one process there, and several at the first
    # step they train, saved, where a resumed run's processes would otherwise agree on step 1,
    # which it never reaches. The watch outlasts `closing(manager)`: a second SIGTERM while
    # the last save commits must not kill the process and lose that checkpoint.
    with PreemptionWatch(start) as preemption, contextlib.closing(manager):
        return _train(config, workdir, manager, start, preemption)


def _train(config: ml_collections.ConfigDict, workdir: str,
           manager: ocp.CheckpointManager, start: int,
           preemption: PreemptionWatch) -> dict[str, float]:
    """`train_and_evaluate` from the resume point `start` on (0: a fresh run). A notice
    during setup (an hours-long dataset build, a restore) stops it before training."""
    prepare(config)
    if preemption.stops_now(start):
        raise PreemptedError(start)
    root = storage_path(workdir)
    root.mkdir(parents=True, exist_ok=True)

    # Mesh, model, optimizer, shardings.
    mesh = make_mesh(config.mesh)
    tokenizer = Tokenizer(config.tokenizer.path, config.tokenizer.max_len)
    setup = TrainSetup(config, tokenizer.vocab_size, mesh)
    evaluators = make_evaluators(config, tokenizer, setup.graphdef, mesh,
                                 cache_dir=str(root / "features"),
                                 interrupted=preemption.interrupts)

    # Input pipeline, and resume.
    data_iter = iter(make_train_dataset(config.data, tokenizer, seed=config.seed))
    train_build = split_build(config.data, config.data.train_split)
    total = config.total_steps
    if start >= total:
        # e.g. a finished job restarted by its scheduler, or a reused --workdir: nothing to
        # train, and the config.json that describes the checkpoint stays.
        logging.warning("%s: the checkpoint at step %d already reaches total_steps=%d; nothing "
                        "to train (evaluate it with `python -m flipjax.evaluate --workdir=%s`; "
                        "a higher config.total_steps trains on, on a schedule stretched to it)",
                        workdir, start, total, workdir)
        with contextlib.closing(open_metrics(workdir, start)) as writer:
            # Only the run's own config and tokenizer complete its results: another's (a
            # reused --workdir) would log numbers of another evaluation under this run's.
            if process0_flag(is_same_run(config, workdir)):
                finish_evaluations(config, evaluators, writer, start, lambda: checkpoint.restore(
                    manager, start, checkpoint.abstract_with_shardings(
                        setup.abstract_state, setup.state_shardings), None)["params"],
                    preemption)
        return {}
    if start:
        if (root / "config.json").exists():  # a checkpoint without one: nothing to compare
            saved = load_workdir_config(workdir)
            check_same_data_position(config, saved, workdir)
            # Another GELU, eps or mean restores into the same shapes and trains on silently,
            # and the config.json written below would then misdescribe the earlier steps.
            check_describes_run(config, workdir)
            warn_if_schedule_changes(config, saved, start)
        check_same_train_build(config, train_build, workdir)
        tokenizer_kept = check_kept_tokenizer(config, workdir)
        abstract = checkpoint.abstract_with_shardings(setup.abstract_state,
                                                      setup.state_shardings)
        state = checkpoint.restore(manager, start, abstract, data_iter)
        # A workdir from before runs kept their tokenizer takes this one, once the checkpoint
        # has restored: a resume that fails keeps none.
        if not process0_flag(tokenizer_kept):  # a collective below: every process alike
            with fails_together("keep the tokenizer"):
                keep_tokenizer(config, workdir)
        if config.model.max_temperature:  # a resume may lower the cap: it holds from here on
            state["params"]["t"] = jnp.minimum(state["params"]["t"],
                                               math.log(config.model.max_temperature))
        logging.info("resumed from step %d", start)
        if preemption.stops_now(start):
            raise PreemptedError(start)
    else:
        with fails_together("keep the tokenizer"):
            keep_tokenizer(config, workdir)
        state = setup.init()
        if config.init_from.path:  # pretrained HF weights, on a fresh run only
            try:
                params, _ = load_into_params(state["params"], config.init_from.path,
                                             config.init_from.towers, config.model,
                                             config.tokenizer.path)
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"config.init_from.path={config.init_from.path!r}: {e}"
                                  ) from e
            state["params"] = jax.device_put(params, setup.state_shardings["params"])
    # Written once the state exists, so a resume that fails leaves the run's config as it was.
    with fails_together("write config.json and train_data.json"):
        if jax.process_index() == 0:
            write_bytes_whole(root / "config.json", config.to_json(indent=2).encode())
            write_bytes_whole(root / TRAIN_DATA_FILE,
                              json.dumps(train_build, indent=2).encode())

    # The loop.
    metrics: dict[str, float] = {}
    progress = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True,
                    disable=None if jax.process_index() == 0 else True)
    last_time, last_step = time.perf_counter(), start
    # Non-finite steps are counted over the run's whole life (checkpointed): "raise" is about new
    # ones, not those a resumed checkpoint already counts (from a "skip" run, or a preemption
    # save that came before the check).
    known_nonfinite = int(jax.device_get(state["nonfinite_steps"]))

    def stop_if_nonfinite(nonfinite_steps: jax.Array | float, at_step: int) -> None:
        if config.nonfinite == "raise" and int(nonfinite_steps) > known_nonfinite:
            raise FloatingPointError(non_finite_message(at_step))

    def save_step(step: int) -> None:
        """Saves `state` and the data position at `step`, its metrics line written out first."""
        writer.flush()
        checkpoint.save(manager, step, state, data_iter)

    prev_nonfinite, preempted_at = None, None
    # closing: a URL workdir's metrics.jsonl is written out on errors too. An error (a failing
    # evaluation, a non-finite loss) waits for a save in flight to land (the caller's
    # `closing(manager)`).
    with contextlib.closing(open_metrics(workdir, start)) as writer:
        if start:
            finish_evaluations(config, evaluators, writer, start, lambda: state["params"],
                               preemption)
            last_time = time.perf_counter()  # out of the first step's time
        for step in range(start + 1, total + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = to_global(next(data_iter), setup.batch_sharding)
                state, step_metrics = setup.train_step(state, batch)
            # Checked one step behind, so the host never waits for the step it just queued.
            if prev_nonfinite is not None:
                stop_if_nonfinite(prev_nonfinite, step - 1)
            prev_nonfinite = step_metrics["nonfinite_steps"]
            progress.update(1)
            preempted = preemption.reached(step)
            scheduled_save = step % config.checkpoint.every_steps == 0 or step == total
            scheduled_evals = (set(config.evals) if step == total else
                               {n for n, e in config.evals.items() if step % e.every_steps == 0})
            # The steps an uninterrupted run logs; a preempted step is checked and saved but
            # logged only if one of them, so a resumed run's metrics.jsonl has the same lines.
            scheduled_log = (step % config.log_every_steps == 0 or scheduled_save
                             or bool(scheduled_evals))
            # A saved step is checked (and logged, if scheduled) first.
            due_save = scheduled_save or preempted
            # Preempted, the grace period is the save's: the resumed run evaluates this step
            # (`finish_evaluations`).
            due_evals = set() if preempted else scheduled_evals
            if scheduled_log or preempted:
                values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                stop_if_nonfinite(values["nonfinite_steps"], step)
                seconds = (time.perf_counter() - last_time) / (step - last_step)
                values.update(step_time_s=seconds,
                              images_per_s=config.data.global_batch_size / seconds)
                metrics = {f"train/{k}": v for k, v in values.items()}
                # The line is written out before its checkpoint can land, and evaluations add
                # to it as they finish: a run stopped while evaluating (a failure, a kill)
                # loses no training metrics, and its resume logs none of these steps again.
                if scheduled_log:
                    writer.write(step, metrics)
                if due_save:
                    save_step(step)
                # Evaluations outlast a preemption's grace period: a notice stops them at the
                # next batch, and the resumed run evaluates this step (`finish_evaluations`).
                preempted = preempted or (bool(due_evals) and preemption.stops_now(step))
                try:
                    for results in run_evaluators(evaluators, state["params"], step,
                                                  set() if preempted else due_evals):
                        metrics.update(results)
                        writer.amend(step, results)
                        if preemption.stops_now(step):
                            preempted = True
                            break
                except EvaluationInterruptedError:
                    preempted = True
                if preempted and not due_save:
                    due_save = True
                    save_step(step)
                if due_save and jax.process_index() == 0:  # the steps Orbax keeps
                    kept = sorted({step, *manager.all_steps()})[-config.checkpoint.keep:]
                    prune_feature_cache(str(root / "features"), kept)
                progress.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}")
                if progress.disable:  # no terminal: a log line instead of the bar
                    logging.info("step %d/%d loss %.4f lr %.2e %.1f images/s", step, total,
                                 values["loss"], values["lr"], values["images_per_s"])
                # Evaluation, logging and saving stay out of the next interval's step time.
                last_time, last_step = time.perf_counter(), step
            if preempted:  # at the last step too: the resumed run evaluates it
                preempted_at = step
                break
    progress.close()
    if preempted_at is not None:
        raise PreemptedError(preempted_at)
    return metrics
