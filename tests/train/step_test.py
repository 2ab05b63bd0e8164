"""Train step: 1 device == 8 devices (fsdp=4 x tensor=2), accumulation == big batch, one compile."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qtarget_jax.config import OptimSection, ScheduleSection
from qtarget_jax.train import mesh as mesh_lib
from qtarget_jax.train.optim import make_optimizer
from qtarget_jax.train.state import init_state
from qtarget_jax.train.step import jit_train_step, split_microbatches
from tests.train.tiny_lm import RULES, TinyLM, ce_loss, make_batch


def run_steps(sizes, microbatches=1, steps=3, devices=None, batches=None,
              compute_dtype=np.float32):
    mesh = mesh_lib.make_mesh(sizes, devices)
    tx, sched = make_optimizer(OptimSection(lr=1e-2, weight_decay=0.1, clip_norm=1.0),
                               ScheduleSection(warmup_steps=1), steps)
    built = init_state(TinyLM(rngs=nnx.Rngs(0), compute_dtype=compute_dtype), tx, mesh, RULES,
                       seed=0)
    step = jit_train_step(built.shardings, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh),
                          graphdef=built.graphdef, loss_fn=ce_loss, tx=tx, schedule=sched,
                          microbatches=microbatches)
    state, losses = built.state, []
    for i in range(steps):
        batch = batches[i] if batches else make_batch(i)
        state, metrics = step(state, mesh_lib.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return state, losses, step


def test_one_vs_eight_devices_same_losses():
    assert jax.device_count() == 8
    _, one, _ = run_steps({"data": 1}, devices=jax.devices()[:1])
    state, eight, step = run_steps({"data": -1, "fsdp": 4, "tensor": 2})
    np.testing.assert_allclose(one, eight, rtol=1e-5, atol=1e-5)
    assert one[-1] < one[0]  # it learns
    assert step._cache_size() == 1  # compiled once across steps
    emb = state.params["embed"].sharding.spec
    assert tuple(emb) == ("tensor", "fsdp"), emb


def test_accumulated_equals_big_batch():
    _, big, _ = run_steps({"data": -1, "fsdp": 4, "tensor": 2}, microbatches=1)
    _, acc, _ = run_steps({"data": -1, "fsdp": 4, "tensor": 2}, microbatches=2)
    # Microbatches with unequal token counts: only the global token mean makes these agree.
    np.testing.assert_allclose(big, acc, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_tracks_float32_and_keeps_f32_master_weights():
    _, f32, _ = run_steps({"data": 1}, devices=jax.devices()[:1])
    state, bf16, _ = run_steps({"data": 1}, devices=jax.devices()[:1],
                               compute_dtype=jnp.bfloat16)
    np.testing.assert_allclose(bf16, f32, rtol=2e-2)
    assert bf16 != f32  # the cast happened
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


def test_split_microbatches_keeps_rows():
    x = np.arange(8)[:, None] * np.ones((1, 3), np.int32)
    out = split_microbatches({"x": x}, 2)["x"]
    assert out.shape == (2, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 2, 4, 6])
    with pytest.raises(ValueError, match="microbatches=3"):
        split_microbatches({"x": x}, 3)


def _bf16(x):
    """x rounded to bfloat16, back in float32 (numpy)."""
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize("tied", [False, True])
def test_float32_head_gradient_under_bfloat16_compute(tied):
    """float32 params + bfloat16 compute: the fused loss gets the float32 head, so the head
    gradient (the tied embedding's, for rows no input token touches) is float32: it equals a
    float32 reference from the bfloat16 matmul inputs, not that reference rounded to bfloat16."""
    from qtarget_jax.models import Decoder, ModelConfig
    from qtarget_jax.targets import get_preset
    from qtarget_jax.train.step import hidden_loss

    vocab, n_in = 64, 24  # input tokens < n_in: embedding rows >= n_in get only the head's grad
    cfg = ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                      tie_word_embeddings=tied, param_dtype="float32",
                      compute_dtype="bfloat16")
    graphdef, params, rest = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    rng = np.random.default_rng(0)
    b, t = 2, 12
    batch = {"tokens": jnp.asarray(rng.integers(0, n_in, (b, t)), jnp.int32),
             "labels": jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32),
             "loss_mask": jnp.ones((b, t), jnp.float32),
             "positions": jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1)),
             "segment_ids": jnp.ones((b, t), jnp.int32)}
    loss_fn = hidden_loss(get_preset("sft"), "token")

    def loss(p):
        model = nnx.merge(graphdef, p, rest)
        h = model(batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True)
        return loss_fn(model, batch, None)[0], h
    grads, h = jax.jit(jax.grad(loss, has_aux=True))(params)
    assert h.dtype == jnp.bfloat16
    head = (params["embedder"]["embedding"][...].T if tied else params["lm_head"][...])
    g = grads["embedder"]["embedding"][...].T if tied else grads["lm_head"][...]
    assert g.dtype == jnp.float32

    # Reference: z = bf16(h) @ bf16(W) in float32, dz = p - onehot(y) rounded to bfloat16 (the
    # matmul input dtype), dW = bf16(h)^T dz accumulated in float64.
    h32 = np.asarray(h.astype(jnp.float32), np.float64).reshape(b * t, -1)
    z = h32 @ _bf16(np.asarray(head)).astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dz = p - np.eye(vocab)[np.asarray(batch["labels"]).reshape(-1)]
    ref = h32.T @ _bf16(dz.astype(np.float32)).astype(np.float64)
    cols = slice(n_in, None) if tied else slice(None)
    ref, got = ref[:, cols], np.asarray(g, np.float64)[:, cols]
    rounded = _bf16(ref.astype(np.float32))
    rtol, atol = 1e-5, 1e-7
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)
    # The bfloat16-rounded gradient is far outside that tolerance: this test can fail.
    assert not np.allclose(rounded, ref, rtol=rtol, atol=atol)
    assert np.max(np.abs(rounded - ref)) > 100 * (atol + rtol * np.max(np.abs(ref)))


def _lora_steps(dropout, microbatches, batches, record=None):
    """Losses of a tiny LoRA Decoder (adapters on q, B randomised so dropout shows) trained
    with `microbatches`; `record` (a list) gets each microbatch's loss sum, in order."""
    from qtarget_jax.models import Decoder, ModelConfig, lora
    from qtarget_jax.models.sharding import LOGICAL_RULES
    from tests.train.multiprocess_worker import MODEL

    model = Decoder(ModelConfig(**MODEL), rngs=nnx.Rngs(0))
    lora.add_lora(model, lora.LoraConfig(rank=4, alpha=8.0, dropout=dropout, targets=("q",)))
    for i, site in enumerate(lora.adapters(model)):
        site.adapter.b.set_value(jax.random.normal(jax.random.PRNGKey(i), site.adapter.b.shape))

    def loss_fn(m, batch, teacher):
        logits = m(batch["tokens"]).astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits),
                                   jnp.maximum(batch["labels"], 0)[..., None], -1)[..., 0]
        loss_sum = jnp.sum(nll * batch["loss_mask"])
        if record is not None:
            jax.debug.callback(lambda x: record.append(float(x)), loss_sum, ordered=True)
        tokens = jnp.sum(batch["loss_mask"])
        return loss_sum, tokens, {"tokens": tokens}

    mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    tx, sched = make_optimizer(OptimSection(lr=1e-2), ScheduleSection(kind="constant"), 3)
    built = init_state(model, tx, mesh, LOGICAL_RULES, seed=0)
    step = jit_train_step(built.shardings, mesh_lib.batch_sharding(mesh),
                          mesh_lib.replicated(mesh), graphdef=built.graphdef, loss_fn=loss_fn,
                          tx=tx, schedule=sched, microbatches=microbatches)
    state, losses = built.state, []
    for batch in batches:
        state, metrics = step(state, mesh_lib.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return losses


def _twin_rows(batch):
    """Each row twice in a row: with 2 microbatches (rows j, 2+j, ...) both get the same data."""
    return {k: np.repeat(v[:4], 2, axis=0) for k, v in batch.items()}


def test_lora_dropout_masks_differ_across_microbatches():
    from tests.train.multiprocess_worker import global_batches
    batch = _twin_rows(global_batches()[0])
    plain, dropped = [], []
    _lora_steps(0.0, 2, [batch], record=plain)
    _lora_steps(0.5, 2, [batch], record=dropped)
    assert len(plain) == len(dropped) == 2
    assert plain[0] == plain[1]                 # the two microbatches hold the same data
    assert dropped[0] != plain[0] and dropped[1] != plain[1]   # dropout acts
    assert dropped[0] != dropped[1], dropped    # ... with a different mask in each


def test_lora_accumulated_equals_big_batch_without_dropout():
    from tests.train.multiprocess_worker import global_batches
    batches = global_batches()
    big = _lora_steps(0.0, 1, batches)
    acc = _lora_steps(0.0, 2, batches)
    np.testing.assert_allclose(big, acc, rtol=1e-5, atol=1e-6)
    assert big[-1] < big[0]
