"""An independent teacher: another width and depth, same tokenizer, frozen, created sharded.

Student: the tiny 2-layer Llama of multiprocess_worker.py (hidden 32). Teacher: twice as wide
(hidden 64, 8 heads) and one layer deeper (3 layers), same vocabulary.
"""
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qtarget_jax.config import ModelSection, OptimSection, ScheduleSection, load_config
from qtarget_jax.models import Decoder, ModelConfig
from qtarget_jax.models.export import export_hf
from qtarget_jax.targets import qtarget_loss_sums, spec_from_dict
from qtarget_jax.train import build, loop
from qtarget_jax.train import mesh as mesh_lib
from qtarget_jax.train.metrics import read_jsonl
from qtarget_jax.train.optim import make_optimizer
from qtarget_jax.train.state import INITIAL, TrainState, init_state
from qtarget_jax.train.step import (jit_train_step, make_loss_fn, merge_models, teacher_head_for,
                                    teacher_logits_for)
from tests.train.multiprocess_worker import MODEL, TEACHER, global_batches

REPO = pathlib.Path(__file__).resolve().parents[2]
TARGETS = {"target_sft": {"preset": "target_sft", "eta": 0.5},
           "distill": {"preset": "distill", "mix": 0.5, "teacher_temperature": 2.0}}


def _models(teacher_cfg=TEACHER):
    return (Decoder(ModelConfig(**MODEL), rngs=nnx.Rngs(0)),
            Decoder(ModelConfig(**teacher_cfg), rngs=nnx.Rngs(1)))


def _loss_and_grads(target, fused, teacher_cfg=TEACHER, real_vocab=None):
    """(loss, student grads, teacher grads) of one batch, token-normalised."""
    student, teacher = _models(teacher_cfg)
    graphdef, params, rest = nnx.split(student, nnx.Param, ...)
    t_graphdef, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
    params, t_params = params.to_pure_dict(), t_params.to_pure_dict()
    state = TrainState(step=0, params=params, opt_state=None, rng=None, teacher=t_params,
                       rest=rest.to_pure_dict(), teacher_rest=t_rest.to_pure_dict())
    loss_fn = make_loss_fn(spec_from_dict(TARGETS[target]), "token", fused=fused,
                           real_vocab=real_vocab)
    batch = {k: jnp.asarray(v) for k, v in global_batches()[0].items()}

    def loss(p, tp):
        model, t_model = merge_models(state.replace(teacher=tp), p, graphdef=graphdef,
                                      teacher_graphdef=t_graphdef)
        total, denom, _ = loss_fn(model, batch, t_model)
        return total / denom
    value, (g, tg) = jax.value_and_grad(loss, argnums=(0, 1))(params, t_params)
    return float(value), g, tg


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fused_equals_unfused_with_a_wider_deeper_teacher(target):
    loss_f, g_f, tg_f = _loss_and_grads(target, fused=True)
    loss_u, g_u, tg_u = _loss_and_grads(target, fused=False)
    np.testing.assert_allclose(loss_f, loss_u, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_f, g_u)
    # The teacher receives no gradient, in either path.
    for tg in (tg_f, tg_u):
        assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(tg))
    # ...and it is used: another teacher (of the student's shape) gives another loss.
    same, _, _ = _loss_and_grads(target, fused=True, teacher_cfg=MODEL)
    assert abs(same - loss_f) > 1e-4


def test_teacher_logits_independent_reference():
    """The unfused teacher path against numpy: H(Q, p) with Q built from the teacher's logits."""
    student, teacher = _models()
    batch = global_batches()[0]
    spec = spec_from_dict(TARGETS["distill"])
    logits = student(jnp.asarray(batch["tokens"]))
    t_logits = teacher(jnp.asarray(batch["tokens"]))
    got, denom, _ = qtarget_loss_sums(logits, batch["labels"], batch["loss_mask"], spec,
                                      teacher_logits=t_logits)
    z, zt = np.asarray(logits, np.float64), np.asarray(t_logits, np.float64) / 2.0
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        z.max(-1, keepdims=True)
    pt = np.exp(zt - zt.max(-1, keepdims=True))
    pt /= pt.sum(-1, keepdims=True)
    onehot = np.eye(z.shape[-1])[np.maximum(batch["labels"], 0)]
    q = 0.5 * onehot + 0.5 * pt
    want = (-(q * logp).sum(-1) * batch["loss_mask"]).sum()
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    loss_fn = make_loss_fn(spec, "token", fused=False)
    total, _, _ = loss_fn(student, {k: jnp.asarray(v) for k, v in batch.items()}, teacher)
    np.testing.assert_allclose(float(total), want, rtol=1e-5)


def test_padding_rows_are_masked_and_fused_matches_unfused():
    """Tokenizer of 100 tokens, student head 128 rows, teacher head 160 rows: the teacher's
    distribution puts no mass on ids >= 100, fused and unfused agree."""
    wide_vocab = dict(TEACHER, vocab_size=160)
    loss_f, g_f, _ = _loss_and_grads("distill", True, wide_vocab, real_vocab=100)
    loss_u, g_u, _ = _loss_and_grads("distill", False, wide_vocab, real_vocab=100)
    np.testing.assert_allclose(loss_f, loss_u, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_f, g_u)
    rng = np.random.default_rng(0)
    h, head = rng.normal(size=(3, 5, 6)), rng.normal(size=(6, 160))
    masked = teacher_logits_for(jnp.asarray(h @ head), 128, 100)
    assert masked.shape == (3, 5, 128)
    probs = np.asarray(jax.nn.softmax(masked))
    assert probs[..., 100:].max() == 0.0
    np.testing.assert_allclose(np.asarray(masked[..., :100]), (h @ head)[..., :100], rtol=1e-6)
    h2, head2 = teacher_head_for(jnp.asarray(h), jnp.asarray(head), 128, 100)
    np.testing.assert_allclose(np.asarray(h2 @ head2), np.asarray(masked), rtol=1e-6, atol=1e-6)


def _run(mesh_sizes, devices=None, target="target_sft", steps=3):
    mesh = mesh_lib.make_mesh(mesh_sizes, devices)
    tx, sched = make_optimizer(OptimSection(lr=1e-2), ScheduleSection(warmup_steps=1), steps)
    student, teacher = _models()
    initial_teacher = jax.tree.map(np.asarray, nnx.state(teacher, nnx.Param).to_pure_dict())
    built = init_state(student, tx, mesh, seed=0, teacher=teacher)
    step = jit_train_step(built.shardings, mesh_lib.batch_sharding(mesh),
                          mesh_lib.replicated(mesh), graphdef=built.graphdef,
                          teacher_graphdef=built.teacher_graphdef,
                          loss_fn=make_loss_fn(spec_from_dict(TARGETS[target]), "token",
                                               fused=True, mesh=mesh), tx=tx,
                          schedule=sched, microbatches=1)
    state, losses = built.state, []
    for batch in global_batches()[:steps]:
        state, metrics = step(state, mesh_lib.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return losses, state, initial_teacher, step._cache_size()


def test_eight_devices_equal_one_and_the_teacher_stays_frozen():
    one, _, _, _ = _run({"data": 1}, jax.devices()[:1])
    eight, state, initial, compiles = _run({"data": 2, "fsdp": 2, "tensor": 2})
    np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-5)
    assert compiles == 1
    # Unchanged after the steps, bit for bit, and never in the optimizer state.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.teacher), initial)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert n_opt - 2 * n_params < 8, (n_opt, n_params)  # Adam mu, nu + counters only
    emb = state.teacher["embedder"]["embedding"]
    assert emb.sharding.spec == state.params["embedder"]["embedding"].sharding.spec
    assert emb.shape == (128, 64)


def write_char_tokenizer(folder, swap=False) -> str:
    """The 98-token character tokenizer of conftest.py; `swap` exchanges the ids of 'a' and 'b'."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    if swap:
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<eos>")
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    fast.save_pretrained(str(folder))
    return str(folder)


def _teacher_folder(folder, tokenizer_folder) -> str:
    from transformers import AutoTokenizer
    cfg = ModelConfig(**TEACHER)
    export_hf(Decoder(cfg, rngs=nnx.Rngs(1)), cfg, str(folder),
              tokenizer=AutoTokenizer.from_pretrained(tokenizer_folder))
    return str(folder)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, char_tokenizer) -> str:
    """An exported run: <run>/hf holds the wider, deeper teacher with the char tokenizer."""
    run = tmp_path_factory.mktemp("teacher_run")
    _teacher_folder(run / "hf", char_tokenizer)
    return str(run)


def test_other_vocabulary_teacher_is_refused_naming_both_sources(tmp_path, char_tokenizer):
    other = _teacher_folder(tmp_path / "t", write_char_tokenizer(tmp_path / "tok", swap=True))
    section = ModelSection(source="init", config=MODEL, tokenizer=char_tokenizer, teacher=other)
    _, _, tok = build.build_model(section, 0)
    with pytest.raises(ValueError) as err:
        build.build_teacher(section, 0, tok)
    msg = str(err.value)
    assert f"model.teacher={other!r}" in msg and char_tokenizer in msg, msg
    assert "differ at id 67: teacher 'b', student 'a'" in msg, msg


def test_teacher_from_an_exported_run_created_sharded(teacher_run, char_tokenizer):
    """fsdp=8: every param of student, optimizer state and teacher holds 1/8 per device."""
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 8})
    section = ModelSection(source="init", config=MODEL, tokenizer=char_tokenizer,
                           teacher=teacher_run, teacher_dtype="bfloat16")
    student, _, tok = build.build_model(section, 0, mesh=mesh)
    teacher, t_cfg = build.build_teacher(section, 0, tok, mesh=mesh)
    assert (t_cfg.hidden_size, t_cfg.num_layers, t_cfg.param_dtype) == (64, 3, "bfloat16")
    tx, _ = make_optimizer(OptimSection(), ScheduleSection(), 10)
    built = init_state(student, tx, mesh, seed=0, teacher=teacher)
    initial = init_state(build.build_model(section, 0, mesh=mesh)[0], tx, mesh, seed=0,
                         teacher=INITIAL, teacher_dtype="bfloat16")
    trees = {"params": built.state.params, "opt_state": built.state.opt_state,
             "teacher": built.state.teacher, "initial teacher": initial.state.teacher}
    checked = 0
    for name, tree in trees.items():
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            if x.ndim == 0:
                continue  # optimizer counters
            for shard in x.addressable_shards:
                assert shard.data.size * 8 == x.size, (name, path, x.shape, shard.data.shape)
            checked += 1
    assert checked > 30
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(built.state.teacher))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(initial.state.teacher))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(built.state.params))
    # The initial teacher is a copy, not the student's buffers (those are donated each step).
    for p, t in zip(jax.tree.leaves(initial.state.params),
                    jax.tree.leaves(initial.state.teacher)):
        np.testing.assert_array_equal(np.asarray(p.astype(jnp.bfloat16)), np.asarray(t))
        assert (p.addressable_shards[0].data.unsafe_buffer_pointer()
                != t.addressable_shards[0].data.unsafe_buffer_pointer())


def _overrides(run_dir, synth_dataset, char_tokenizer, teacher_run, *extra):
    return (f"run.dir={run_dir}", f"data.path={synth_dataset}",
            f"model.tokenizer={char_tokenizer}", f"model.teacher={teacher_run}",
            "loss.target.preset=target_sft", "loss.target.eta=0.5", "mesh.data=2",
            "mesh.fsdp=2", "mesh.tensor=2", "schedule.kind=constant", "run.steps=8",
            "checkpoint.every_steps=2", "logging.plot=false", "logging.tensorboard=false",
            *extra)


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(pathlib.Path(run_dir) / "metrics.jsonl")
            if "loss" in r}


@pytest.mark.slow
def test_teacher_run_sigkill_then_resume_equals_uninterrupted(tmp_path, synth_dataset,
                                                               char_tokenizer, teacher_run):
    job = REPO / "configs" / "tiny_test.yaml"
    whole = tmp_path / "whole"
    loop.run(load_config(job, _overrides(whole, synth_dataset, char_tokenizer, teacher_run)))
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(job),
           *_overrides(killed, synth_dataset, char_tokenizer, teacher_run)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    t0, metrics = time.time(), killed / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < 300, "timed out waiting for metrics"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    summary = loop.run(load_config(job, _overrides(killed, synth_dataset, char_tokenizer,
                                                   teacher_run)))
    assert 2 <= summary["start_step"] < 8
    want, got = _losses(whole), _losses(killed)
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)],
                               rtol=1e-5, atol=1e-5)
