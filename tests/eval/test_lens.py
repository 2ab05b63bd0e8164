"""lens.py: Q per token against an independent numpy Target-SFT target; table and PNG."""
import json

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


def _numpy_p(model, tokenizer, prompt, response):
    """Reference: (positions, labels, p [n, V] float64) of the supervised tokens."""
    from qtarget_jax.data.chat import tokenize_conversation, to_training_example
    from qtarget_jax.data.records import Message

    ids, mask = tokenize_conversation(
        tokenizer, [Message("user", prompt), Message("assistant", response)], "t")
    ex = to_training_example(ids, mask, 256, truncate=False, where="t")
    where = np.nonzero(ex.labels != -100)[0]
    logits = np.asarray(model(ex.tokens[None].astype(np.int32)))[0, where].astype(np.float64)
    return where, ex.labels[where], _softmax(logits)


def _table_cells(table):
    """Fixed-width columns of `render_table` -> [(pos, token, gamma, p, q, [alt masses])]."""
    out = []
    for line in table.splitlines()[2:]:
        alts = [float(line[53 + 20 * k:59 + 20 * k]) for k in range((len(line) - 40) // 20)]
        out.append((int(line[:4]), line[5:19].rstrip(), float(line[20:26]),
                    float(line[27:33]), float(line[34:40]), alts))
    return out


def _png_checks(path, rows, colours):
    """The heat map: the size plot_lens asks for (1 + 2 + top columns, one row per token at
    120 dpi), and each expected cell colour painted over a real area, not a stray pixel."""
    import matplotlib
    import matplotlib.image

    img = matplotlib.image.imread(str(path))[..., :3]
    cols = 2 + max(len(r.alternatives) for r in rows)
    assert img.shape == (int((0.8 + 0.28 * len(rows)) * 120), int((2.0 + 1.6 * cols) * 120), 3)
    viridis = matplotlib.colormaps["viridis"]
    for value in colours:
        rgb = np.asarray(viridis(value)[:3])
        close = np.all(np.abs(img - rgb) < 1.5 / 255, axis=-1).sum()
        assert close > 200, (value, close)


def test_table_and_png_hold_the_label_smoothing_target(tiny_model, tokenizer, tmp_path):
    """Label smoothing (eps = 0.1, V = 128): gamma = 0.9, Q(y) = 0.9 + 0.1 / V, every other
    token 0.1 / V; p(y) from numpy. Checked in the table text and in the PNG's colours."""
    rows = target_lens(tiny_model, tokenizer, "label_smoothing", "hi", "ab\nx", top=2)
    where, labels, p = _numpy_p(tiny_model, tokenizer, "hi", "ab\nx")
    assert len(rows) == len(where) >= 3
    v = p.shape[-1]
    cells = _table_cells(render_table(rows))
    for r, cell, pos, y, row_p in zip(rows, cells, where, labels, p):
        assert r.position == pos and r.gamma == pytest.approx(0.9, abs=1e-6)
        assert r.p_label == pytest.approx(row_p[y], abs=1e-5)
        assert r.q_label == pytest.approx(0.9 + 0.1 / v, abs=1e-6)
        assert [m for _, m in r.alternatives] == pytest.approx([0.1 / v] * 2, abs=1e-7)
        assert cell[:2] == (pos, json.dumps(tokenizer.decode([int(y)]))[1:-1][:14])
        assert cell[2:5] == pytest.approx((0.9, row_p[y], 0.9 + 0.1 / v), abs=5.01e-4)
        assert cell[5] == pytest.approx([0.1 / v] * 2, abs=5.01e-4)
    path = tmp_path / "lens.png"
    plot_lens(rows, str(path), "label smoothing")
    _png_checks(path, rows, colours=(0.9, 0.9 + 0.1 / v, 0.1 / v))


def test_cli_on_hf_folder(tiny_model, tokenizer, tmp_path, capsys):
    """The CLI on an exported model: Target-SFT at eta = 1 with the model as its own teacher is
    Q = p_y onehot(y) + (1 - p_y) p, checked against numpy in the rows and the printed table."""
    from qtarget_jax.models.export import export_hf

    export_hf(tiny_model, tiny_model.cfg, str(tmp_path / "hf"), tokenizer=tokenizer)
    rows = main(["--model", str(tmp_path / "hf"), "--preset", "target_sft", "--knob", "eta=1",
                 "--prompt", "hi", "--response", "ab x", "--top", "3",
                 "--png", str(tmp_path / "l.png")])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"target lens: model={tmp_path / 'hf'} preset=target_sft eta=1 "
                      "teacher=model itself")
    assert out[-1] == f"wrote {tmp_path / 'l.png'}"
    where, labels, p = _numpy_p(tiny_model, tokenizer, "hi", "ab x")
    assert [r.position for r in rows] == list(where) and len(rows) >= 3
    cells = _table_cells("\n".join(out[1:-1]))
    for r, cell, y, row_p in zip(rows, cells, labels, p):
        q = (1 - row_p[y]) * row_p
        q[y] += row_p[y]
        alt = [k for k in np.argsort(-q, kind="stable") if k != y][:3]
        assert r.gamma == pytest.approx(row_p[y], abs=1e-5)
        assert r.q_label == pytest.approx(q[y], abs=1e-5)
        assert [m for _, m in r.alternatives] == pytest.approx(q[alt], abs=1e-5)
        assert cell[2:5] == pytest.approx((row_p[y], row_p[y], q[y]), abs=5.01e-4)
        assert cell[5] == pytest.approx(q[alt], abs=5.01e-4)
    _png_checks(tmp_path / "l.png", rows, colours=[r.q_label for r in rows])
