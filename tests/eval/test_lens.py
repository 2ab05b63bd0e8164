"""lens.py: Q per token against an independent numpy Target-SFT target; table and PNG."""
import numpy as np
import pytest

from qtarget_jax.lens import main, plot_lens, render_table, target_lens
from qtarget_jax.targets import get_preset


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def test_target_sft_rows_match_numpy_reference(tiny_model, tokenizer):
    from qtarget_jax.data.chat import tokenize_conversation, to_training_example
    from qtarget_jax.data.records import Message

    teacher = tiny_model
    spec = get_preset("target_sft", eta=0.5)
    rows = target_lens(tiny_model, tokenizer, spec, "hi ab", "ab ab x", teacher=teacher, top=3)
    ids, mask = tokenize_conversation(
        tokenizer, [Message("user", "hi ab"), Message("assistant", "ab ab x")], "t")
    ex = to_training_example(ids, mask, 256, truncate=False, where="t")
    where = np.nonzero(ex.labels != -100)[0]
    assert [r.position for r in rows] == list(where)
    logits = np.asarray(tiny_model(ex.tokens[None].astype(np.int32)))[0, where].astype(np.float64)
    p = _softmax(logits)
    # Teacher == student here, so pi_tilde ∝ p^(1-eta) p^eta = p; gamma = p_y.
    for r, row_p, y in zip(rows, p, ex.labels[where]):
        q = (1 - row_p[y]) * row_p
        q[y] += row_p[y]
        assert r.gamma == pytest.approx(row_p[y], abs=1e-5)
        assert r.q_label == pytest.approx(q[y], abs=1e-5)
        assert r.token == tokenizer.decode([int(y)])
        alt = [k for k in np.argsort(-q) if k != y][:3]
        assert [m for _, m in r.alternatives] == pytest.approx(q[alt], abs=1e-5)


def test_sft_puts_all_mass_on_the_label(tiny_model, tokenizer):
    rows = target_lens(tiny_model, tokenizer, "sft", "hi", "ab x", top=2)
    assert all(r.gamma == 1.0 and r.q_label == pytest.approx(1.0) for r in rows)
    assert all(m == 0.0 for r in rows for _, m in r.alternatives)
    with pytest.raises(ValueError, match="needs a teacher"):
        target_lens(tiny_model, tokenizer, "distill", "hi", "ab x")


def test_table_and_png(tiny_model, tokenizer, tmp_path):
    rows = target_lens(tiny_model, tokenizer, "label_smoothing", "hi", "ab\nx", top=2)
    table = render_table(rows)
    assert len(table.splitlines()) == len(rows) + 2  # newlines in tokens are escaped
    path = tmp_path / "lens.png"
    plot_lens(rows, str(path), "label smoothing")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_on_hf_folder(tiny_model, tokenizer, tmp_path, capsys):
    from qtarget_jax.models.export import export_hf

    export_hf(tiny_model, tiny_model.cfg, str(tmp_path / "hf"), tokenizer=tokenizer)
    rows = main(["--model", str(tmp_path / "hf"), "--preset", "target_sft", "--knob", "eta=1",
                 "--prompt", "hi", "--response", "ab x", "--png", str(tmp_path / "l.png")])
    out = capsys.readouterr().out
    assert "preset=target_sft eta=1 teacher=model itself" in out
    assert len(rows) >= 3 and (tmp_path / "l.png").exists()
