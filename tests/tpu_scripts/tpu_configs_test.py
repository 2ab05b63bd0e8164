"""The TPU/GPU job configs: valid against the config schema, batch and every parameter shard
divide on the device count they are written for, and the annotated parameter counts (the base
of their memory estimates) match the model built abstractly (no weights, no devices)."""
from __future__ import annotations

import math

import jax
import pytest
from flax import nnx
from tpu_helpers import REPO

from qtarget_jax.config import load_config
from qtarget_jax.models import Decoder, ModelConfig
from qtarget_jax.models.sharding import param_shardings
from qtarget_jax.targets import spec_from_dict

# job -> (devices it is written for, ModelConfig preset, parameter count in its comments)
JOBS = {
    "tpu_v5p_llama3_8b": (32, ModelConfig.llama3_8b, 8.03e9),
    "gpu_8xh100_llama3_8b": (8, ModelConfig.llama3_8b, 8.03e9),
    "tpu_v5e_llama32_1b": (8, ModelConfig.llama32_1b, 1.24e9),
}


def _load(job: str):
    """The job resolved exactly as `train.py --config configs/<job>.yaml` resolves it."""
    return load_config(REPO / "configs" / f"{job}.yaml").config


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_config_loads_and_divides(job):
    devices, preset, _ = JOBS[job]
    cfg = _load(job)
    assert spec_from_dict(dict(cfg.loss.target)).name == "target_sft"
    assert cfg.model.compute_dtype == "bfloat16" and cfg.model.remat == "full"
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, -1, 1)
    per_microbatch, rest = divmod(cfg.data.batch_size, cfg.data.microbatches * devices)
    assert rest == 0 and per_microbatch >= 1, (
        f"{job}: batch_size {cfg.data.batch_size} must split into {cfg.data.microbatches} "
        f"microbatches over {devices} devices")
    assert preset().max_position_embeddings >= cfg.data.seq_len


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_param_shards_on_the_intended_mesh(job):
    devices, preset, params_in_comment = JOBS[job]
    cfg = _load(job)
    model_cfg = preset(**cfg.model.config)
    abstract = nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0)))
    n_params = sum(math.prod(v.shape)
                   for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert n_params == pytest.approx(params_in_comment, rel=0.005), (
        f"{job}: the memory notes assume {params_in_comment:.3g} params, model has {n_params}")
    mesh = jax.sharding.AbstractMesh((1, devices, 1), ("data", "fsdp", "tensor"))
    shardings = nnx.to_flat_state(param_shardings(abstract, mesh))  # raises if a dim won't divide
    fsdp_sharded = [path for path, s in shardings if "fsdp" in jax.tree.leaves(tuple(s.spec))]
    assert len(fsdp_sharded) == len(shardings), "every weight should be split over fsdp"
