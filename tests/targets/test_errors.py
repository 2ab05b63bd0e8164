"""Bad input gets a clear error naming the value at fault (or NaN under jit, never silence)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtarget_jax import targets
from qtarget_jax.targets import TargetSpec, get_preset, qtarget_loss

V = 11
LOGITS = jnp.zeros((2, 3, V))
LABELS = jnp.ones((2, 3), jnp.int32)


def test_label_out_of_range_eager():
    bad = LABELS.at[1, 2].set(V)
    with pytest.raises(ValueError, match=r"label 11 at position \(1, 2\) is outside"):
        qtarget_loss(LOGITS, bad, None, "sft")
    with pytest.raises(ValueError, match="label -3"):
        qtarget_loss(LOGITS, LABELS.at[0, 0].set(-3), None, "sft")


def test_label_out_of_range_under_jit_is_nan_not_silent():
    bad = LABELS.at[1, 2].set(V + 5)
    loss, _ = jax.jit(qtarget_loss, static_argnames="spec")(LOGITS, bad, spec="sft")
    assert np.isnan(loss)
    # ... but not when that position is masked out.
    mask = jnp.ones((2, 3)).at[1, 2].set(0)
    loss, _ = jax.jit(qtarget_loss, static_argnames="spec")(LOGITS, bad, mask, spec="sft")
    assert np.isfinite(loss)


@pytest.mark.parametrize("logits,labels,match", [
    (jnp.zeros((2, 4, V)), LABELS, r"logits \(2, 4, 11\) must be labels \(2, 3\)"),
    (jnp.zeros((2, 3)), LABELS, "Incorrect shapes"),
    (LOGITS, LABELS.astype(jnp.float32), "labels must be integer"),
    (LOGITS.astype(jnp.int32), LABELS, "logits must be floating"),
])
def test_shape_and_dtype_errors(logits, labels, match):
    with pytest.raises((ValueError, TypeError), match=match):
        qtarget_loss(logits, labels, None, "sft")


def test_mask_shape_error():
    with pytest.raises(ValueError, match=r"mask \(2, 4\) must equal labels \(2, 3\)"):
        qtarget_loss(LOGITS, LABELS, jnp.ones((2, 4)), "sft")


def test_errors_are_raised_at_trace_time():
    with pytest.raises(ValueError, match="Incorrect shapes"):
        jax.jit(qtarget_loss, static_argnames="spec")(jnp.zeros((2, 4, V)), LABELS, spec="sft")


@pytest.mark.parametrize("field,value", [("gamma_value", 1.5), ("gamma_value", -0.1),
                                         ("gamma_floor", 2.0), ("eta", 1.2)])
def test_gamma_and_eta_outside_unit_interval(field, value):
    with pytest.raises(ValueError, match=f"{field}={value} must lie in \\[0, 1\\]"):
        TargetSpec(gamma="constant", residual="uniform", **{field: value})


def test_weights_outside_unit_interval():
    spec = get_preset("token_weighted")
    with pytest.raises(ValueError, match=r"weight 1.5 at position \(0, 1\) is outside \[0, 1\]"):
        qtarget_loss(LOGITS, LABELS, None, spec, weights=jnp.zeros((2, 3)).at[0, 1].set(1.5))
    loss, _ = jax.jit(qtarget_loss, static_argnames="spec")(
        LOGITS, LABELS, spec=spec, weights=jnp.zeros((2, 3)).at[0, 1].set(1.5))
    assert np.isnan(loss)


def test_custom_gamma_rule_outside_unit_interval_is_nan():
    targets.register_gamma_rule("test_bad_gamma")(lambda ctx: 2.0 * jnp.ones_like(ctx.p_y))
    try:
        spec = TargetSpec(gamma="test_bad_gamma", residual="uniform")
        loss, _ = qtarget_loss(LOGITS, LABELS, None, spec)
        assert np.isnan(loss)
    finally:
        targets.rules.GAMMA_RULES.pop("test_bad_gamma")


def test_teacher_vocabulary_differs():
    spec = get_preset("target_sft")
    with pytest.raises(ValueError, match="teacher vocabulary 12 differs from the student's 11"):
        qtarget_loss(LOGITS, LABELS, None, spec, teacher_logits=jnp.zeros((2, 3, 12)))
    with pytest.raises(ValueError, match="teacher_logits"):
        qtarget_loss(LOGITS, LABELS, None, spec, teacher_logits=jnp.zeros((2, 4, V)))


def test_teacher_tokenizer_strings_differ():
    targets.check_teacher_tokenizer(["a", "b"], {"a": 0, "b": 1})
    with pytest.raises(ValueError, match="differ at id 1: teacher 'c', student 'b'"):
        targets.check_teacher_tokenizer(["a", "b"], ["a", "c"])
    with pytest.raises(ValueError, match="teacher vocabulary has 3 tokens, the student's 2"):
        targets.check_teacher_tokenizer(["a", "b"], ["a", "b", "c"])


@pytest.mark.parametrize("name", ["target_sft", "distill", "kl_anchor", "topk"])
def test_preset_needing_teacher_without_one(name):
    with pytest.raises(ValueError, match=f"target '{name}' needs teacher_logits"):
        qtarget_loss(LOGITS, LABELS, None, get_preset(name))


def test_preset_needing_weights_without_them():
    with pytest.raises(ValueError, match="needs per-token `weights`"):
        qtarget_loss(LOGITS, LABELS, None, get_preset("token_weighted"))


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown target preset 'target-sft' \(did you mean "
                                         r"'target_sft'\?\); known presets: \['dft', 'distill'"):
        get_preset("target-sft")


def test_unknown_knob_and_config_key():
    with pytest.raises(ValueError, match=r"preset 'target_sft' has no knob 'etta' \(did you mean "
                                         r"'eta'\?\)"):
        get_preset("target_sft", etta=0.5)
    with pytest.raises(ValueError, match="target config key 'gama'"):
        targets.spec_from_dict({"gama": "p_y"})


def test_spec_rule_errors():
    with pytest.raises(ValueError, match="not a known gamma rule"):
        TargetSpec(gamma="nope")
    with pytest.raises(ValueError, match="without a residual must put all its mass"):
        TargetSpec(gamma="p_y", residual="none")
    with pytest.raises(ValueError, match="needs a residual that ranks tokens"):
        TargetSpec(gamma="p_y", residual="uniform", top_k=4)
    with pytest.raises(ValueError, match="normalization='mean'"):
        qtarget_loss(LOGITS, LABELS, None, "sft", normalization="mean")
    with pytest.raises(ValueError, match="needs normalizer > 0"):
        qtarget_loss(LOGITS, LABELS, None, "sft", normalization="constant")
