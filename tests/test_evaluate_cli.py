"""Evaluators on a saved checkpoint: the standalone `python -m flipjax.evaluate`, the feature
cache, and a probe whose choices provably ignore the test split."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from conftest import REPO

from flipjax.config import ConfigError
from flipjax.data.pipeline import make_train_dataset
from flipjax.data.tokenizer import Tokenizer
from flipjax.evaluate import make_evaluators
from flipjax.train import checkpoint
from flipjax.train.sharding import fit_mesh, make_mesh
from flipjax.train.step import TrainSetup
from flipjax.train.workdir import check_describes_run, load_workdir_config, restore_params


def save_initial_run(config, workdir):
    """A workdir as training leaves it (config.json + a checkpoint at step 1, holding the
    initial params), without compiling a train step."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())
    tokenizer = Tokenizer(config.tokenizer.path, config.tokenizer.max_len)
    setup = TrainSetup(config, tokenizer.vocab_size, make_mesh(config.mesh))
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    data_iter = iter(make_train_dataset(config.data, tokenizer, seed=0))
    state = setup.init()
    checkpoint.save(manager, 1, state, data_iter)
    manager.wait_until_finished()
    manager.close()
    return setup, tokenizer, state["params"]


@pytest.fixture(scope="module")
def saved_run(tiny_data, tmp_path_factory):
    from conftest import load_config

    config = load_config()
    config.data.data_dir, config.tokenizer.path = tiny_data
    workdir = str(tmp_path_factory.mktemp("run"))
    return (config, workdir) + save_initial_run(config, workdir)


def test_cli_writes_eval_json(saved_run):
    workdir = saved_run[1]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "flipjax.evaluate", f"--workdir={workdir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "eval_step_1.json")) as f:
        out = json.load(f)
    assert out["step"] == 1
    results = out["results"]
    for key in ("retrieval/t2i_R@1", "linear_probe/mean_acc", "linear_probe/chosen_l2",
                "linear_probe/acc/Eyeglasses", "zeroshot/mean_acc", "zeroshot/acc/Male"):
        assert key in results, sorted(results)
    assert 0 <= results["linear_probe/mean_acc"] <= 100
    assert results["linear_probe/val_carved"] == 0.0
    assert any(name.startswith("synthetic_faces-tiny_test_attributes_step1_")
               for name in os.listdir(os.path.join(workdir, "features")))


@pytest.mark.parametrize("module", ["flipjax.evaluate", "flipjax.embed"])
def test_cli_names_a_wrong_workdir_or_step(saved_run, tmp_path, module):
    """A mistyped --workdir or --step is one line naming it and exit 2, not a traceback."""
    env = dict(os.environ, PYTHONPATH=REPO)
    extra = ["--texts=/dev/null", f"--output={tmp_path}/out"] if module == "flipjax.embed" else []
    for args, message in [([f"--workdir={tmp_path}"], f"{tmp_path}: no config.json here"),
                          ([f"--workdir={saved_run[1]}", "--step=99"],
                           r"no checkpoint at step 99 in .*; saved steps: \[1\]")]:
        proc = subprocess.run([sys.executable, "-m", module, *args, *extra], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert re.search(f"^error: {message}", proc.stderr, re.MULTILINE), proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr


def test_a_run_trained_on_more_devices_restores_here(saved_run, tmp_path, caplog):
    """A pod run's mesh (16 slots here, on 8 devices) does not fit: evaluation, embedding and
    export restore its parameters onto the same axis names over this machine's devices."""
    workdir, params = saved_run[1], saved_run[4]
    copy = tmp_path / "pod_run"
    shutil.copytree(workdir, copy)
    saved = json.loads((copy / "config.json").read_text())
    saved["mesh"] = [["data", 4], ["fsdp", 4]]
    (copy / "config.json").write_text(json.dumps(saved))
    # All devices on fsdp (the state stays sharded), else on the first batch axis.
    assert fit_mesh(saved["mesh"], 8) == [("data", 1), ("fsdp", -1)]
    assert fit_mesh([["data", -1], ["fsdp", 4]], 8) == [["data", -1], ["fsdp", 4]]
    assert fit_mesh([("tensor", 2), ("data", 4)], 3) == [("tensor", 1), ("data", -1)]
    restored, step, setup, _ = restore_params(load_workdir_config(str(copy)), str(copy), None)
    assert step == 1 and dict(setup.mesh.shape) == {"data": 1, "fsdp": 8}
    assert "does not fit this machine's 8 devices" in caplog.text
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def evaluate_with_config_file(workdir, path, config) -> subprocess.CompletedProcess:
    """`python -m flipjax.evaluate --config=path`, `path` a config file returning `config`."""
    path.write_text("import ml_collections\n\n\ndef get_config():\n"
                    f"    return ml_collections.ConfigDict({config.to_dict()!r})\n")
    return subprocess.run([sys.executable, "-m", "flipjax.evaluate", f"--workdir={workdir}",
                           f"--config={path}"], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=600)


def test_a_config_for_another_model_is_refused(saved_run, tmp_path):
    """`flipjax.evaluate --config` must describe the trained run: another GELU or input mean
    would restore and silently compute something else. Compute choices may differ, and sizes
    compare as resolved (another variant name with the same sizes is the same model)."""
    config, workdir = saved_run[0], saved_run[1]

    def changed(**fields):
        other = ml_collections.ConfigDict(config.to_dict())
        for field, value in fields.items():
            node, keys = other, field.split("__")
            for key in keys[:-1]:
                node = node[key]
            node[keys[-1]] = value
        return other

    check_describes_run(config, workdir)
    check_describes_run(changed(model__dtype="bfloat16", model__attention="dot",
                                model__remat="full", model__image__variant="Ti/8"), workdir)
    for fields, message in (
            (dict(model__gelu="exact"), "model.gelu: 'exact' differs from 'tanh'"),
            (dict(model__text__causal=True), "model.text.causal: True differs from False"),
            (dict(data__mean=[0.25, 0.5, 0.75]),
             "data.mean: [0.25, 0.5, 0.75] differs from [0.5, 0.5, 0.5]"),
            (dict(model__image__variant="mu/16"),
             "model.image.variant: 'patch 16' differs from 'patch 8'"),
            (dict(model__bias_init=-10.0), "model.bias_init: 'a learned bias' differs from None"),
            (dict(optim__mu_dtype="bfloat16"), "optim.mu_dtype: 'bfloat16' differs from None")):
        with pytest.raises(ConfigError, match=rf"^config\.{re.escape(message)} in "
                                              rf".*config\.json, the run this checkpoint"):
            check_describes_run(changed(**fields), workdir)

    # As the command runs it: one line, exit 2, before anything is restored.
    proc = evaluate_with_config_file(workdir, tmp_path / "other.py", changed(model__gelu="exact"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: config.model.gelu: 'exact' differs from 'tanh'" in proc.stderr


def test_cli_checks_the_evaluators_fields_first(saved_run, tmp_path):
    """`--config` brings its own evaluators: their fields are checked as training checks
    them, before anything is restored."""
    config, workdir = saved_run[0], saved_run[1]
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.evals.probe = dict(type="linear_probe", every_steps=1, features="layer")
    proc = evaluate_with_config_file(workdir, tmp_path / "bad.py", bad)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: config.evals.probe: linear probe features 'layer'" in proc.stderr


def test_probe_choice_ignores_poisoned_test_cache(saved_run, tmp_path):
    config, _, setup, tokenizer, params = saved_run
    config = ml_collections.ConfigDict(config.to_dict())  # the fixture's is shared
    config.evals = {"probe": dict(type="linear_probe", train_split="train", val_split=None,
                                  l2_grid=(0.0, 1e-1), epochs_grid=(1, 5), probe_batch_size=64,
                                  batch_size=32)}
    probe = make_evaluators(config, tokenizer, setup.graphdef, setup.mesh,
                            cache_dir=str(tmp_path))["probe"]
    clean = probe.run(params, step=7)
    assert clean["val_carved"] == 1.0 and clean["num_val"] == pytest.approx(0.1 * 512, abs=1)
    (test_file,) = [p for p in tmp_path.iterdir() if "_test_" in p.name]
    with np.load(test_file) as f:
        feats, labels = f["features"], f["labels"]
    rng = np.random.default_rng(0)
    np.savez(test_file, features=rng.normal(size=feats.shape).astype(np.float32) * 50,
             labels=1 - labels)
    dirty = probe.run(params, step=7)
    for key in ("chosen_l2", "chosen_epochs", "val_score", "num_train", "num_val"):
        assert dirty[key] == clean[key], key
    assert dirty["mean_acc"] != clean["mean_acc"]  # the poisoned cache was read, for test only


def test_feature_cache_is_keyed_by_the_datasets_build(saved_run, tmp_path):
    """A copy of the dataset elsewhere (or a rebuild) gets its own cache file, so features of
    one build are never served for another."""
    import shutil

    from flipjax.evaluate.features import feature_cache_path

    config = saved_run[0]
    copy = ml_collections.ConfigDict(config.data.to_dict())
    copy.data_dir = str(tmp_path / "copy")
    shutil.copytree(config.data.data_dir, copy.data_dir)
    paths = [feature_cache_path(str(tmp_path), cfg, "test", "attributes", 1, "abc")
             for cfg in (config.data, config.data, copy)]
    assert paths[0] == paths[1] != paths[2]
    assert paths[2].name.startswith("synthetic_faces-tiny_test_attributes_step1_")
    # A nested label key stays in the cache directory (where pruning looks) and apart from a
    # flat key that reads alike there.
    nested, flat = (feature_cache_path(str(tmp_path), config.data, "test", key, 1, "abc")
                    for key in ("labels/age", "labels_age"))
    assert nested.parent == flat.parent == tmp_path and nested != flat


def test_feature_cache_is_keyed_by_the_weights(saved_run, tmp_path):
    """A run rolled back and retrained past an evaluated step has other weights at that step:
    its features are computed anew, not read from the earlier run's cache file."""
    import jax

    from flipjax.evaluate.features import image_features

    config, _, setup, tokenizer, params = saved_run
    embedder = make_evaluators(config, tokenizer, setup.graphdef, setup.mesh)["zeroshot"].embedder
    first = image_features(embedder, params, config.data, "test[:32]", "attributes",
                           cache_dir=str(tmp_path), step=3)
    retrained = jax.tree.map(lambda x: x * 1.5, params)
    second = image_features(embedder, retrained, config.data, "test[:32]", "attributes",
                            cache_dir=str(tmp_path), step=3)
    assert len(list(tmp_path.iterdir())) == 2
    assert not np.allclose(first["features"], second["features"], atol=1e-3)
    again = image_features(embedder, retrained, config.data, "test[:32]", "attributes",
                           cache_dir=str(tmp_path), step=3)  # read back from its own file
    np.testing.assert_array_equal(again["features"], second["features"])


def test_probe_carves_validation_by_group(saved_run):
    """`val_group_key` reads each train record's group from the split itself; ids are unique
    here, so whole groups of one make the usual 10%."""
    config, _, setup, tokenizer, params = saved_run
    config = ml_collections.ConfigDict(config.to_dict())
    config.evals = {"probe": dict(type="linear_probe", train_split="train", val_split=None,
                                  val_group_key="id", l2_grid=(0.0, 0.1), epochs_grid=(1,),
                                  probe_batch_size=64, batch_size=32)}
    probe = make_evaluators(config, tokenizer, setup.graphdef, setup.mesh)["probe"]
    out = probe.run(params)
    assert out["val_carved"] == 1.0 and out["num_val"] == pytest.approx(0.1 * 512, abs=1)
    assert out["num_train"] + out["num_val"] == 512


@pytest.mark.parametrize("splits,shared", [
    (dict(train_split="train", val_split="validation", test_split="train[-10%:]"),
     "train_split 'train' and test_split"),
    (dict(train_split="train[:300]", val_split="train[299:]+validation"),
     "train_split 'train\\[:300\\]' and val_split"),
    (dict(val_split="test[:50%]", test_split="test[25%:]"), "val_split 'test\\[:50%\\]' and "
                                                            "test_split")])
def test_a_probe_whose_splits_share_records_is_refused(saved_run, splits, shared):
    """Test records in train or validation (the official FLIP code's LFWA leak) are refused
    when the evaluators are made, before any training; adjoining slices are fine."""
    config, _, setup, tokenizer, _ = saved_run
    config = ml_collections.ConfigDict(config.to_dict())
    probe = dict(type="linear_probe", train_split="train[:300]", val_split="train[300:]",
                 test_split="test")
    config.evals = {"apart": probe, "probe": {**probe, **splits}}
    with pytest.raises(ConfigError, match=rf"config\.evals\.probe: {shared} .* share records"):
        make_evaluators(config, tokenizer, setup.graphdef, setup.mesh)


def test_a_diverged_checkpoint_fails_evaluation_rather_than_scoring_a_constant(saved_run):
    """NaN features compare false with everything: a probe or zero-shot evaluation would
    score a diverged checkpoint as the all-negative predictor. Every evaluator refuses it."""
    config, _, setup, tokenizer, params = saved_run
    diverged = {**params, "img": jax.tree.map(lambda x: x * np.nan, params["img"])}
    evaluators = make_evaluators(config, tokenizer, setup.graphdef, setup.mesh)
    assert set(evaluators) == {"retrieval", "linear_probe", "zeroshot"}
    for evaluator in evaluators.values():
        with pytest.raises(ValueError, match=r"outputs for \d+ of \d+ inputs hold NaN or Inf"):
            evaluator.run(diverged, step=None)


def test_probe_on_flips_layer_features(saved_run, tmp_path):
    """`features="layers"` fits FLIP's head on the class token, patch mean and max of the
    chosen blocks and the last; those features (12x an embedding's size) are not cached."""
    from flipjax.config import validate
    from flipjax.evaluate.features import image_features

    config, _, setup, tokenizer, params = saved_run
    config = ml_collections.ConfigDict(config.to_dict())
    probe = dict(type="linear_probe", every_steps=1, train_split="train[:256]",
                 val_split="validation", l2_grid=(0.0,), epochs_grid=(2,), probe_batch_size=64,
                 batch_size=32)
    config.evals = {"layers": {**probe, "features": "layers"},  # blocks: (1,) of 2, as FLIP's
                    "embedding": probe}
    evaluators = make_evaluators(config, tokenizer, setup.graphdef, setup.mesh,
                                 cache_dir=str(tmp_path))
    layers = evaluators["layers"].run(params, step=1)
    embedding = evaluators["embedding"].run(params, step=1)
    assert 0 <= layers["mean_acc"] <= 100 and layers["num_train"] == 256
    assert layers["val_score"] != embedding["val_score"]
    cached = [p.name for p in tmp_path.iterdir() if "train" in p.name]
    assert len(cached) == 1, cached  # the embeddings'
    features = image_features(evaluators["layers"].embedder, params, config.data, "test[:8]",
                              "attributes", layers=True)["features"]
    # Mean and max of block 1, and the MAP-pooled vector (no class token), mean and max of
    # the last.
    assert features.shape == (8, 5, config.model.image.width)
    assert features.dtype == np.float16
    config.evals.layers.blocks = (config.model.image.depth,)
    with pytest.raises(ValueError, match=r"config\.evals\.layers\.blocks: \(2,\) must be "
                                         r"block numbers 1\.\.1 of the 2-block image tower"):
        validate(config)


@pytest.mark.parametrize("change,message", [
    (dict(val_splt="validation"), r"config\.evals\.probe\.val_splt: not a field of a "
                                  r"'linear_probe' evaluator \(did you mean 'val_split'\?\)"),
    (dict(test_split="tst"), r"config\.evals\.probe\.test_split='tst' .*Unknown split"),
    (dict(features="layer"), r"config\.evals\.probe: linear probe features 'layer' is not "
                             r"one of \('embedding', 'layers'\)"),
    (dict(test_split="test[:0]"), r"config\.evals\.probe\.test_split='test\[:0\]'"),
    (dict(label_key="atributes"), r"config\.evals\.probe\.label_key='atributes': dataset "
                                  r"'synthetic_faces/tiny' .* has no such feature"),
    (dict(type="zeroshot_attributes", split="test", attributes=("Smiling", "Eyeglases")),
     r"config\.evals\.probe: attributes \['Eyeglases'\] are not attributes"),
    (dict(type="zeroshot_attributes", split="test",
          attribute_names=[f"trait_{i}" for i in range(19)]),
     r"config\.evals\.probe: no zero-shot prompts for attribute 'trait_0'"),
    (dict(type="retrieval"), r"config\.evals\.probe\.split: required by a 'retrieval' "
                             r"evaluator, and not set"),
])
def test_evaluator_mistakes_stop_before_any_work(saved_run, change, message):
    """A misspelt field, split or feature is an error naming the field when the evaluators
    are made (before training), not a default silently kept or a crash at the first eval."""
    config, setup, tokenizer = saved_run[0], saved_run[2], saved_run[3]
    config = ml_collections.ConfigDict(config.to_dict())
    probe = dict(type="linear_probe", every_steps=1)
    config.evals = {"probe": {**probe, **change}}
    with pytest.raises(ValueError, match=message):
        make_evaluators(config, tokenizer, setup.graphdef, setup.mesh)


def test_zeroshot_names_the_attributes_whose_prompts_the_text_length_cuts(saved_run, caplog):
    """The tiny config's 16 tokens cut some prompts, which may then read like their
    opposites: the evaluator says which attributes, when it is made."""
    config, setup, tokenizer = saved_run[0], saved_run[2], saved_run[3]
    config = ml_collections.ConfigDict(config.to_dict())
    config.evals = {"zs": dict(type="zeroshot_attributes", split="test", every_steps=1)}
    with caplog.at_level("WARNING"):
        make_evaluators(config, tokenizer, setup.graphdef, setup.mesh)
    warned = [r.getMessage() for r in caplog.records if "longer than the text length 16" in
              r.getMessage()]
    assert len(warned) == 1 and "'Smiling'" in warned[0], warned


def test_evaluator_config_has_one_default_per_field():
    """An evaluator's fields are its Config dataclass: unset ones and None placeholders take
    the one default, and sequences read back from JSON (lists) are tuples."""
    from ml_collections.config_dict import placeholder

    from flipjax.evaluate import evaluator_config
    from flipjax.evaluate.linear_probe import ProbeConfig

    cfg = ml_collections.ConfigDict(dict(type="linear_probe", every_steps=5,
                                         val_split=placeholder(str), test_split="validation",
                                         l2_grid=[0.0, 0.1]))
    probe = evaluator_config("probe", cfg)
    assert probe == ProbeConfig(test_split="validation", l2_grid=(0.0, 0.1))
    assert (probe.train_split, probe.val_split, probe.label_key) == ("train", None, "attributes")
