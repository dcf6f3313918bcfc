import ast
import functools
import itertools
import json
import pathlib
import re
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from conftest import REPO, load_config
from ml_collections import config_flags

from flipjax.config import ConfigError, validate
from flipjax.train.sharding import check_tensor_groups, make_mesh
from flipjax.train.step import TrainSetup
from flipjax.train.workdir import load_workdir_config


@pytest.mark.parametrize("field,value,message", [
    ("data.global_batch_size", 12, r"config\.data\.global_batch_size: 12 is not divisible"),
    ("model.image.variant", "Q/16", r"config\.model\.image\.variant: unknown model size 'Q'"),
    ("model.text.variant", "B/16", r"config\.model\.text\.variant: .*takes no patch size"),
    ("data.image_size", 36, r"config\.model\.image\.image_size: 36 is not divisible"),
    ("loss", "hinge", r"config\.loss: unknown loss 'hinge'"),
    ("model.image.pool", "cls", r"config\.model\.image\.pool"),
    ("model.text.proj_dim", 48, r"config\.model\.text\.proj_dim: the towers' embeddings differ"),
    ("mesh", [("data", 3), ("fsdp", -1)], r"config\.mesh"),
    ("model.remat", "some", r"config\.model\.remat: 'some' is not one of"),
    ("model.attention", "flash", r"config\.model\.attention: 'flash' is not 'auto' or"),
    ("seed", -1, r"config\.seed: -1 must be 0 or more"),
    ("optim.decay_regex", "kernel$", r"config\.optim\.decay_regex: 'kernel\$' matches no "
                                     r"parameter, so config\.optim\.weight_decay=.* decays"),
    ("model.attention", "cudnn", r"config\.model\.attention: 'cudnn' needs JAX's default device"),
    ("optim.mu_dtype", "float16", r"config\.optim\.mu_dtype: 'float16'"),
    ("sharding_rules", [(".*", "shard")], r"config\.sharding_rules: unknown strategy 'shard'"),
    ("sharding_rules", [(".*", (3,))], r"config\.sharding_rules: '\.\*' has dims"),
    ("sharding_rules", [(".*", (None, "tensr"))], r"config\.sharding_rules: .*\['tensr'\]"),
    ("log_every_steps", 0, r"config\.log_every_steps: 0 must be positive"),
    ("checkpoint.every_steps", 0, r"config\.checkpoint\.every_steps: 0 must be positive"),
    ("checkpoint.keep", 0, r"config\.checkpoint\.keep: 0 must be positive"),
    ("model.temperature_init", 200.0, r"config\.model\.temperature_init: 200\.0 is above "
                                      r"model\.max_temperature=100\.0"),
    ("evals.retrieval.every_steps", 0, r"config\.evals\.retrieval\.every_steps: 0 must be"),
    ("evals.retrieval.batch_size", 12, r"config\.evals\.retrieval\.batch_size: 12 is not a "
                                       r"positive multiple of the 8 batch shards"),
    ("evals.retrieval.batch_size", -8, r"config\.evals\.retrieval\.batch_size: -8 is not"),
    ("optim.frozen_regex", "img/(", r"config\.optim\.frozen_regex: 'img/\(' is not a regular"),
    ("optim.lr_mults", [("txt/[", 0.1)], r"config\.optim\.lr_mults\[0\]: 'txt/\[' is not"),
    ("sharding_rules", [("*", "fsdp")], r"config\.sharding_rules\[0\]: '\*' is not a regular"),
    ("loss", "sigmoid", r"config\.model\.bias_init: the sigmoid loss needs a learnable bias"),
    ("optim.frozen_regex", "img", r"config\.optim\.frozen_regex='img' matches no parameter"),
    ("evals.retrieval.eval_resize", "stretch",
     r"config\.evals\.retrieval\.eval_resize: 'stretch' is not one of"),
])
def test_validation_names_the_field(field, value, message):
    config = load_config()
    node = config
    *path, last = field.split(".")
    for p in path:
        node = node[p]
    node[last] = value
    with pytest.raises(ConfigError, match=message):
        validate(config)


def test_freeze_and_lr_rules_must_match_a_parameter():
    """Rules match whole names; a rule written as a prefix (or a sharding rule's
    "params/img/...") would freeze nothing, and says so instead."""
    from flipjax.train.optimizer import param_groups

    config = load_config()
    params = TrainSetup(config, 200, make_mesh(config.mesh)).abstract_state["params"]
    for pattern in ("img", "img/", "params/img/.*"):
        config.optim.frozen_regex = pattern
        with pytest.raises(ValueError, match=r"config\.optim\.frozen_regex='.*' matches no "):
            param_groups(params, config.optim)
    config.optim.frozen_regex = "img/.*"
    config.optim.lr_mults = (("txt/.*", 0.1), ("txt/encoder/.*", 0.5))  # the second is shadowed
    with pytest.raises(ValueError, match=r"config\.optim\.lr_mults\[1\]='txt/encoder/\.\*'"):
        param_groups(params, config.optim)
    config.optim.lr_mults = (("txt/.*", 0.1),)
    labels = param_groups(params, config.optim)
    groups = {}
    for path, label in jax.tree_util.tree_leaves_with_path(labels):
        groups.setdefault(label, set()).add(path[0].key)
    assert groups == {"frozen": {"img"}, "lr_mult_0": {"txt"}, "default": {"t"}}


@pytest.mark.parametrize("text,message", [
    (dict(pool="first", causal=True), r"config\.model\.text\.pool: 'first' with "),
    (dict(pool="eos", causal=True, eos_id=2), r"config\.model\.text\.eos_id: 2 is not"),
])
def test_text_pooling_that_ignores_the_caption_is_refused(text, message):
    config = load_config()
    config.model.text.update(text)
    with pytest.raises(ConfigError, match=message):
        validate(config)


@pytest.mark.parametrize("field,value,message", [
    ("model.gelu", "relu", r"config\.model: gelu must be one of \['exact', 'quick', 'tanh'\]"),
    ("data.eval_resize", "crop", r"config\.data\.eval_resize: 'crop' is not one of"),
    ("data.eval_resize", None, r"config\.data\.eval_resize: None is not one of .* add "),
])
def test_validation_names_a_field_no_earlier_check_covers(field, value, message):
    config = load_config()
    section, name = field.split(".")
    if value is None:  # a config file written before the field existed
        del config[section][name]
    else:
        config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        validate(config)


def test_validation_names_a_linear_probes_kind():
    config = load_config()
    config.evals.probe = dict(type="linear_probe", every_steps=10, kind="multi")
    with pytest.raises(ConfigError,
                       match=r"config\.evals\.probe: linear probe kind 'multi' is not one"):
        validate(config)


def test_an_evaluators_batch_size_none_is_the_default():
    config = load_config()
    config.evals.retrieval.batch_size = None
    validate(config)


def test_a_tensor_axis_splits_no_examples():
    """On 8 devices with tensor=2 the batch has 4 shards: 12 pairs is valid, 10 is not."""
    config = load_config()
    config.mesh = [("data", -1), ("fsdp", 1), ("tensor", 2)]
    config.data.global_batch_size = 12
    validate(config)
    config.data.global_batch_size = 10
    with pytest.raises(ConfigError, match=r"10 is not divisible by the 4 batch shards"):
        validate(config)


def test_a_tensor_axis_must_stay_inside_one_process():
    """Two hosts of 4 devices: `tensor` last keeps each pair on one host; first, it spans both."""
    host = lambda i: types.SimpleNamespace(process_index=i // 4)
    devices = np.array([host(i) for i in range(8)], dtype=object)
    check_tensor_groups(devices.reshape(4, 2), ("data", "tensor"))
    with pytest.raises(ValueError, match=r"tensor axis \(2 devices\) spans processes \[0, 1\]"):
        check_tensor_groups(devices.reshape(2, 4), ("tensor", "data"))


def test_the_pod_config_validates_shards_and_lowers(tmp_path):
    """configs/base.py, the TPU-VM entry point (B/16 towers, batch 4096, scanned layers,
    sharded loss), which the other tests never load: on 8 devices as 2 data x 4 fsdp it
    passes validation once its dataset and tokenizer exist, its large kernels are split over
    fsdp, and its train step lowers."""
    config = load_config("base", None)
    config.mesh = [("data", 2), ("fsdp", 4)]
    with pytest.raises(ConfigError, match=r"config\.data\.name: dataset 'facecaption15m'"):
        validate(config)
    config.data.data_dir = str(tmp_path)
    # Another config built there is not the default one TFDS would read.
    (tmp_path / "facecaption15m" / "flat" / "1.0.0").mkdir(parents=True)
    (tmp_path / "facecaption15m" / "flat" / "1.0.0" / "dataset_info.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"config\.data\.name: dataset 'facecaption15m'"):
        validate(config)
    (tmp_path / "facecaption15m" / "default" / "1.0.0").mkdir(parents=True)
    (tmp_path / "facecaption15m" / "default" / "1.0.0" / "dataset_info.json").write_text("{}")
    config.tokenizer.path = str(tmp_path / "spm.model")
    (tmp_path / "spm.model").write_bytes(b"")
    validate(config)

    setup = TrainSetup(config, config.tokenizer.vocab_size, make_mesh(config.mesh))
    fc1 = setup.abstract_state["params"]["img"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"]
    assert fc1.shape == (12, 768, 3072)  # 12 stacked B blocks
    fc1_sharding = setup.state_shardings["params"]["img"]["encoder"]["layers"]["mlp"]["fc1"]
    assert "fsdp" in str(fc1_sharding["kernel"].spec)
    lowered = setup.train_step.lower(setup.abstract_state, setup.abstract_batch)
    assert "stablehlo.while" in lowered.as_text()


def leaf_types(config, prefix=""):
    """{dotted field: its type as ml_collections overrides it} of every leaf of `config`."""
    types_ = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            types_.update(leaf_types(value, f"{prefix}{key}."))
        else:
            types_[prefix + key] = config.get_type(key)
    return types_


@pytest.mark.parametrize("name,arg", [("base", None), ("demo", None), ("demo", "tiny")])
def test_every_config_field_can_be_set_on_the_command_line(name, arg):
    """ml_collections' flags cannot override a field holding a plain None or a list, so an
    unset field is a typed placeholder and a sequence a tuple."""
    unsettable = {field: t for field, t in leaf_types(load_config(name, arg)).items()
                  if t in (type(None), list)}
    assert not unsettable


def test_the_readmes_overrides_parse():
    """Every `--config.FIELD=VALUE` in the READMEs parses as `flipjax.main` parses its flags,
    on configs/base.py and configs/demo.py, and sets the value it says."""
    readme = "".join((pathlib.Path(REPO) / path).read_text()
                     for path in ("README.md", "tfds_builders/README.md"))
    overrides = re.findall(r"--config\.([\w.]+)=('[^']*'|[^\s`]+)", readme)
    assert len(overrides) >= 8
    for (field, value), name in itertools.product(overrides, ("base", "demo")):
        text = value.strip("'")
        argv = ["main", f"--config={REPO}/configs/{name}.py", f"--config.{field}={text}"]
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, flag_values=flag_values,
                                        lock_config=True, sys_argv=argv)
        flag_values(argv)
        try:
            want = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            want = text
        got = functools.reduce(getattr, field.split("."), flag_values.config)
        assert got == want or str(got) == text, (name, field, got, want)  # e.g. inf


def test_workdir_config_of_an_older_run_is_filled_in(tmp_path):
    config = load_config()
    saved = json.loads(config.to_json())
    saved["model"]["remat"] = True  # runs before remat named a policy
    del saved["model"]["scan_layers"], saved["model"]["attention"], saved["optim"]["mu_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = load_workdir_config(str(tmp_path))
    assert loaded.model.remat == "full" and loaded.model.scan_layers is False
    assert loaded.model.attention == "auto" and loaded.optim.mu_dtype is None


def test_missing_dataset_and_tokenizer_are_reported(tmp_path):
    config = load_config()
    config.data.data_dir = str(tmp_path)
    config.data.build_if_missing = False
    with pytest.raises(ConfigError, match=r"config\.data\.name: .*not built.*tfds_builders build"):
        validate(config)
    config.data.build_if_missing = True
    config.tokenizer.train_if_missing = False
    config.tokenizer.path = str(tmp_path / "none.model")
    with pytest.raises(ConfigError, match=r"config\.tokenizer\.path: .*does not exist"):
        validate(config)


@pytest.mark.parametrize("override,error", [
    ("--config.data.global_batch_size=13",
     "error: config.data.global_batch_size: 13 is not divisible by the 8 batch shards "
     "(devices outside any tensor axis); use a multiple of 8"),
    ("--config.model.image.widht=64",  # a misspelt override: the parser's own error
     "error: --config.model.image.widht: the config has no field config.model.image.widht "
     "(did you mean config.model.image.width?)"),
])
def test_main_prints_one_line_and_exits_2(tmp_path, override, error):
    result = subprocess.run(
        [sys.executable, "-m", "flipjax.main", "--config=configs/demo.py:tiny",
         f"--workdir={tmp_path}", override],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu",
             "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [error]


def test_demo_config_loads_outside_the_repository(tmp_path):
    """`configs/demo.py` reads `base.py` from beside itself: named by an absolute path from
    another directory (no `configs` package importable), it is the same config."""
    script = ("from absl import flags; from ml_collections import config_flags; "
              "config_flags.DEFINE_config_file('config'); "
              f"flags.FLAGS(['x', '--config={REPO}/configs/demo.py:tiny']); "
              "print(flags.FLAGS.config.to_json())")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == json.loads(load_config().to_json())


def test_a_saved_run_whose_decay_regex_matches_nothing_still_restores(tiny_config):
    """`validate` refuses such a decay_regex before training; a run saved before that check
    must still build its train state, which evaluation, embedding and export restore into."""
    tiny_config.optim.decay_regex = "kernel$"
    with pytest.raises(ConfigError, match=r"config\.optim\.decay_regex: 'kernel\$'"):
        validate(tiny_config)
    TrainSetup(tiny_config, tiny_config.tokenizer.vocab_size, make_mesh(tiny_config.mesh))
