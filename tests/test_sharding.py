import jax
import numpy as np
import pytest
from conftest import assert_same_trained_params, load_config
from jax.sharding import PartitionSpec

from flipjax.data.pipeline import make_train_dataset, to_global
from flipjax.data.tokenizer import Tokenizer
from flipjax.train import checkpoint
from flipjax.train.sharding import (
    TENSOR_PARALLEL_RULES,
    explicit_spec,
    fsdp_spec,
    infer_shardings,
    make_mesh,
    mesh_shape,
)
from flipjax.train.step import TrainSetup


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, r, n = config.data.global_batch_size, config.data.image_size, config.model.text.max_len
    return {"image": rng.integers(0, 256, (b, r, r, 3), dtype=np.uint8),
            "text": rng.integers(0, 200, (b, n)).astype(np.int32)}


def run_steps(config, devices, batches):
    mesh = make_mesh(config.mesh, devices)
    setup = TrainSetup(config, 200, mesh)
    state = setup.init()
    losses = []
    for batch in batches:
        state, metrics = setup.train_step(state, to_global(batch, setup.batch_sharding))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"]), state


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_data_fsdp_mesh_matches_single_device(loss):
    config = load_config()
    config.loss = loss
    config.fsdp_min_size_mb = 0.0
    batches = [random_batch(config, s) for s in range(3)]
    config.mesh = [("data", 1), ("fsdp", 1)]
    single_losses, single_params, _ = run_steps(config, jax.devices()[:1], batches)
    config.mesh = [("data", 4), ("fsdp", 2)]
    losses, params, state = run_steps(config, jax.devices(), batches)
    np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
    assert_same_trained_params(params, single_params)
    kernel = state["params"]["img"]["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"]
    assert "fsdp" in tuple(kernel.sharding.spec), kernel.sharding
    mu = state["opt_state"][2].inner_states["default"].inner_state[0].mu
    assert mu["img"]["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"].sharding == kernel.sharding


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_tensor_parallel_mesh_matches_single_device(loss):
    """data x fsdp x tensor (2x2x2), Megatron rules for the blocks and fsdp for the rest."""
    config = load_config()
    config.update(loss=loss, loss_impl="sharded", fsdp_min_size_mb=0.0)
    config.model.scan_layers = True
    batches = [random_batch(config, s) for s in range(2)]
    config.mesh = [("data", 1)]
    single_losses, single_params, _ = run_steps(config, jax.devices()[:1], batches)
    config.mesh = [("data", 2), ("fsdp", 2), ("tensor", 2)]
    config.sharding_rules = TENSOR_PARALLEL_RULES + ((".*", "fsdp"),)
    losses, params, state = run_steps(config, jax.devices(), batches)
    np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
    assert_same_trained_params(params, single_params)
    # The activations are pinned too: attention heads and MLP features over `tensor`.
    setup = TrainSetup(config, 200, make_mesh(config.mesh))
    hlo = setup.train_step.lower(setup.abstract_state,
                                 to_global(batches[0], setup.batch_sharding)).as_text()
    pinned = [line for line in hlo.splitlines() if "sharding_constraint" in line]
    assert any('{"tensor"}' in line for line in pinned), pinned[:5]
    layers = state["params"]["img"]["encoder"]["layers"]  # scanned: (depth, in, out) kernels
    assert layers["attn"]["q"]["kernel"].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert layers["mlp"]["fc2"]["kernel"].sharding.spec == PartitionSpec(None, "tensor", "fsdp")
    assert layers["mlp"]["fc1"]["bias"].sharding.spec == PartitionSpec(None, "tensor")


def test_explicit_spec_counts_dims_from_the_last_and_drops_what_cannot_split():
    sizes = {"data": 2, "fsdp": 4, "tensor": 2}
    assert explicit_spec((8, 6), ("fsdp", "tensor"), sizes) == PartitionSpec("fsdp", "tensor")
    assert explicit_spec((3, 8, 6), ("fsdp", "tensor"), sizes) == PartitionSpec(
        None, "fsdp", "tensor")
    assert explicit_spec((6, 5), ("fsdp", "tensor"), sizes) == PartitionSpec(None, None)  # 4∤6, 2∤5
    assert explicit_spec((8,), (("data", "fsdp"),), sizes) == PartitionSpec(("data", "fsdp"))
    assert explicit_spec((8, 8), ("expert", None), sizes) == PartitionSpec(None, None)


def test_checkpoint_restores_onto_another_mesh(tiny_config, tmp_path):
    """Saved on 8 x data, restored onto 2 x data x 4 x fsdp: the same next-step loss."""
    config = tiny_config
    config.fsdp_min_size_mb = 0.0
    tok = Tokenizer(config.tokenizer.path, config.tokenizer.max_len)
    config.mesh = [("data", 8)]
    setup = TrainSetup(config, tok.vocab_size, make_mesh(config.mesh))
    it = iter(make_train_dataset(config.data, tok, seed=config.seed))
    state = setup.init()
    for _ in range(2):
        state, _ = setup.train_step(state, to_global(next(it), setup.batch_sharding))
    manager = checkpoint.make_manager(str(tmp_path), config.checkpoint)
    checkpoint.save(manager, 2, state, it)
    manager.wait_until_finished()
    batch = next(it)
    _, metrics = setup.train_step(state, to_global(batch, setup.batch_sharding))

    config.mesh = [("data", 2), ("fsdp", 4)]
    setup2 = TrainSetup(config, tok.vocab_size, make_mesh(config.mesh))
    abstract = checkpoint.abstract_with_shardings(setup2.abstract_state, setup2.state_shardings)
    state2 = checkpoint.restore(manager, 2, abstract, None)
    kernel = state2["params"]["img"]["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"]
    assert "fsdp" in tuple(kernel.sharding.spec), kernel.sharding
    _, metrics2 = setup2.train_step(state2, to_global(batch, setup2.batch_sharding))
    np.testing.assert_allclose(float(metrics2["loss"]), float(metrics["loss"]), rtol=1e-6)
    manager.close()


def test_fsdp_spec_picks_largest_divisible_dim():
    assert fsdp_spec((6, 16), 4, 4, 0) == PartitionSpec(None, "fsdp")
    assert fsdp_spec((16, 6), 4, 4, 0) == PartitionSpec("fsdp", None)
    assert fsdp_spec((6, 6), 4, 4, 0) == PartitionSpec()
    assert fsdp_spec((1024, 1024), 4, 4, 8) == PartitionSpec()  # 4 MiB < 8 MiB threshold


def test_a_large_leaf_fsdp_cannot_split_is_named_in_a_warning(caplog):
    """No dimension divisible by the fsdp axis: the leaf is replicated, which is correct but
    can run a pod out of memory, so the log says which and how big."""
    mesh = make_mesh([("data", 1), ("fsdp", -1)])
    tree = {"big": jax.ShapeDtypeStruct((3, 1025, 1023), np.float32),
            "even": jax.ShapeDtypeStruct((3, 1024, 1023), np.float32),
            "small": jax.ShapeDtypeStruct((3, 5), np.float32)}
    with caplog.at_level("WARNING"):
        shardings = infer_shardings(tree, mesh, [(".*", "fsdp")], min_size_mb=1)
    assert shardings["big"].spec == PartitionSpec() == shardings["small"].spec
    assert shardings["even"].spec == PartitionSpec(None, "fsdp", None)
    warned = [r.getMessage() for r in caplog.records if "replicated" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("big (3, 1025, 1023): no dimension "
                                                     "divisible by fsdp=8"), warned


@pytest.mark.parametrize("axes,expected", [([("data", -1), ("fsdp", 1)], (8, 1)),
                                           ([("data", 2), ("fsdp", -1)], (2, 4)),
                                           ([("data", 8)], (8,))])
def test_mesh_shape(axes, expected):
    assert mesh_shape(axes, 8) == expected


@pytest.mark.parametrize("axes", [[("data", 3), ("fsdp", -1)], [("data", -1), ("fsdp", -1)],
                                  [("data", 4), ("fsdp", 4)]])
def test_mesh_shape_rejects(axes):
    with pytest.raises(ValueError, match="config.mesh"):
        mesh_shape(axes, 8)
