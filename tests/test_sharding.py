"""Mesh construction, logical-axis rules and sharded initialisation on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from fixtures import demo_config
from vlm_jax import optim, sharding


class Mlp(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(16, 32, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
        self.down = nnx.Linear(32, 16, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs)
        self.odd = nnx.Linear(16, 3, kernel_init=nnx.with_partitioning(init, ("embed", "vocab")), rngs=rngs)

    def __call__(self, x):
        return self.odd(self.down(jax.nn.gelu(self.up(x))))


def init_sharded(create, mesh):
    """``create()``'s state built directly into the shardings its logical axis names give (as the trainer does)."""
    with nnx.use_eager_sharding(False):
        graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
        shardings = sharding.state_shardings(abstract_state, mesh)
        state = jax.jit(lambda: nnx.state(create()), out_shardings=shardings)()
    return graphdef, state


def test_mesh_shape_resolves_rest_and_rejects_bad_sizes():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2}, 8) == (4, 2, 1)
    assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 2}, 8) == (1, 4, 2)
    with pytest.raises(ValueError, match="divide"):
        sharding.mesh_shape({"data": 3}, 8)
    with pytest.raises(ValueError, match="unknown"):
        sharding.mesh_shape({"model": 2}, 8)
    with pytest.raises(ValueError, match="uses 4"):
        sharding.mesh_shape({"data": 2, "fsdp": 2}, 8)


def test_logical_rules_skip_reused_and_indivisible_axes():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.logical_to_spec(("embed", "mlp"), (16, 32), mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("embed", "vocab"), (16, 3), mesh) == P("fsdp", None)
    assert sharding.logical_to_spec(("embed", "embed"), (16, 16), mesh) == P("fsdp", None)
    assert sharding.logical_to_spec(None, (5,), mesh) == P()


def test_init_sharded_places_params_and_matches_unsharded_numerics():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state = init_sharded(lambda: Mlp(nnx.Rngs(0)), mesh)
    assert state["up"]["kernel"][...].sharding.spec == P("fsdp", "tensor")
    assert state["down"]["kernel"][...].sharding.spec == P("tensor", "fsdp")
    assert state["up"]["bias"][...].sharding.spec == P()
    with nnx.use_eager_sharding(False):
        ref = Mlp(nnx.Rngs(0))
    np.testing.assert_array_equal(state["up"]["kernel"][...], ref.up.kernel[...])
    x = jax.device_put(jnp.ones((8, 16)), sharding.batch_sharding(mesh))
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_allclose(out, ref(jnp.ones((8, 16))), rtol=1e-5, atol=1e-6)


def test_optimizer_state_follows_parameter_shardings():
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    graphdef, state = init_sharded(lambda: Mlp(nnx.Rngs(0)), mesh)
    params = nnx.state(nnx.merge(graphdef, state), nnx.Param)
    cfg = demo_config().optim  # one group "all" for every parameter
    cfg.accum_steps = 2
    tx = optim.make_optimizer(cfg, 10).tx
    abstract = jax.eval_shape(tx.init, params)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    sh = sharding.derived_shardings(abstract, params, param_sh, mesh)
    specs = {optim.path_to_str(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(sh)}
    up = [k for k, s in specs.items() if k.endswith("up/kernel")]
    assert len(up) >= 3  # accumulator, mu, nu
    assert all(specs[k] == P("fsdp", None) for k in up)
    opt_state = jax.jit(tx.init, out_shardings=sh)(params)
    assert jax.tree.leaves(opt_state)[0] is not None


def test_global_batch_is_split_over_data_and_fsdp():
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    batch = sharding.global_batch({"x": np.arange(16 * 3).reshape(16, 3)}, mesh)
    assert batch["x"].sharding.spec == P(("data", "fsdp"))
    assert len(batch["x"].addressable_shards) == 8
    assert batch["x"].addressable_shards[0].data.shape == (2, 3)


def test_initialize_distributed_is_a_no_op_without_flags_or_cluster(monkeypatch):
    for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    sharding.initialize_distributed()
    assert jax.process_count() == 1
    with pytest.raises(ValueError, match="together"):
        sharding.initialize_distributed(coordinator_address="127.0.0.1:1234")
