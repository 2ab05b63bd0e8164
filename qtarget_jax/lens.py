"""The target lens: per supervised token, the observed token, gamma and where Q puts its mass.

    python -m qtarget_jax.lens --model smollm2 --preset target_sft --knob eta=0.5 \\
        --prompt "Tom has 3 apples and gets 4 more. How many?" --response "3 + 4 = 7\\n#### 7" \\
        --png lens.png

For each supervised position t (the assistant tokens, as training supervises them) it shows the
observed token y_t, gamma_t, p(y_t), Q(y_t) and the `top` tokens of Q_t other than y_t with their
mass: Q_t = gamma_t onehot(y_t) + (1 - gamma_t) pi_tilde_t is computed by
`targets.qtarget_distribution` from the model's logits (and the teacher's, when the preset needs
one: by default the same model, frozen, i.e. the initial model as teacher).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtarget_jax.libtpu_env import quiet_without_tpu


@dataclasses.dataclass(frozen=True)
class LensRow:
    """One supervised position."""

    position: int                    # index in the model input
    token: str                       # observed (label) token text
    gamma: float                     # trust in the label, gamma_t
    p_label: float                   # student probability of the label, p(y_t)
    q_label: float                   # Q_t(y_t) = gamma_t + (1 - gamma_t) pi_tilde_t(y_t)
    alternatives: list[tuple[str, float]]  # top tokens of Q_t other than y_t, with their mass


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


def target_lens(model: nnx.Module, tokenizer: Any, spec: Any, prompt: str | list[dict],
                response: str, *, teacher: nnx.Module | None = None,
                top: int = 5) -> list[LensRow]:
    """Lens rows for `response` as the assistant answer to `prompt` under target `spec`.

    Args:
      model: the student Decoder. tokenizer: its chat tokenizer.
      spec: a TargetSpec or preset name.
      prompt: a user message or the chat before the answer. response: the answer text.
      teacher: the teacher Decoder when spec.needs_teacher (same tokenizer).
      top: alternatives shown per position.
    """
    from qtarget_jax.data.chat import tokenize_conversation, to_training_example
    from qtarget_jax.data.records import Message
    from qtarget_jax.targets import get_preset, per_token_qtarget, qtarget_distribution

    spec = get_preset(spec) if isinstance(spec, str) else spec
    if spec.needs_teacher and teacher is None:
        raise ValueError(f"target_lens: preset {spec.name!r} needs a teacher; pass teacher=")
    chat = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    conv = [Message(m["role"], m["content"]) for m in chat] + [Message("assistant", response)]
    ids, mask = tokenize_conversation(tokenizer, conv, "lens input")
    context = model.cfg.max_position_embeddings
    ex = to_training_example(ids, mask, context, truncate=False, where="lens input")
    tokens = jnp.asarray(ex.tokens[None])
    where = np.nonzero(ex.labels != -100)[0]
    labels = jnp.asarray(ex.labels[where])
    logits = model(tokens)[0, where]
    teacher_logits = None if not spec.needs_teacher else teacher(tokens)[0, where]
    q = np.asarray(qtarget_distribution(logits, labels, spec, teacher_logits=teacher_logits))
    per = per_token_qtarget(logits, labels, spec, teacher_logits=teacher_logits)
    gamma, p_y = np.asarray(per["gamma"]), np.asarray(per["p_y"])
    rows = []
    for i, pos in enumerate(where):
        y = int(labels[i])
        order = [int(k) for k in np.argsort(-q[i])[:top + 1] if int(k) != y][:top]
        rows.append(LensRow(int(pos), _token_text(tokenizer, y), float(gamma[i]),
                            float(p_y[i]), float(q[i, y]),
                            [(_token_text(tokenizer, k), float(q[i, k])) for k in order]))
    return rows


def render_table(rows: Sequence[LensRow]) -> str:
    """Fixed-width text table, one line per supervised token."""
    top = max((len(r.alternatives) for r in rows), default=0)
    head = f"{'pos':>4} {'token':<14} {'gamma':>6} {'p(y)':>6} {'Q(y)':>6}  " + "  ".join(
        f"{'alt' + str(k + 1):<18}" for k in range(top))
    lines = [head, "-" * len(head)]
    for r in rows:
        alts = "  ".join(f"{json.dumps(t)[1:-1][:10]:<10} {m:6.3f} " for t, m in r.alternatives)
        lines.append(f"{r.position:>4} {json.dumps(r.token)[1:-1][:14]:<14} {r.gamma:6.3f} "
                     f"{r.p_label:6.3f} {r.q_label:6.3f}  {alts}")
    return "\n".join(lines)


def plot_lens(rows: Sequence[LensRow], path: str, title: str = "") -> None:
    """Heat map PNG: one row per token; columns gamma, Q(y), then Q's top alternatives; each
    cell coloured by its mass and labelled with its token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max((len(r.alternatives) for r in rows), default=0)
    cols = ["gamma", "Q(y)"] + [f"alt {k + 1}" for k in range(top)]
    mass = np.zeros((len(rows), len(cols)))
    text = [["" for _ in cols] for _ in rows]
    for i, r in enumerate(rows):
        mass[i, 0], text[i][0] = r.gamma, f"{r.gamma:.2f}"
        mass[i, 1], text[i][1] = r.q_label, f"{r.token!r} {r.q_label:.2f}"
        for k, (tok, m) in enumerate(r.alternatives):
            mass[i, 2 + k], text[i][2 + k] = m, f"{tok!r} {m:.2f}"
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(cols), 0.8 + 0.28 * len(rows)))
    im = ax.imshow(mass, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7,
                    color="white" if mass[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), [f"{r.position} {r.token!r}" for r in rows], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_title(title, fontsize=9, pad=24)
    fig.colorbar(im, ax=ax, fraction=0.03, label="mass in Q")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _knobs(items: Sequence[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--knob {item!r} is not name=value")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> list[LensRow]:
    p = argparse.ArgumentParser(prog="python -m qtarget_jax.lens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2', a .gguf or an HF folder")
    p.add_argument("--preset", default="target_sft", help="target preset (targets.PRESETS)")
    p.add_argument("--knob", action="append", default=[], help="preset knob name=value")
    p.add_argument("--teacher", default=None,
                   help="teacher source (default: the model itself, frozen)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--response", required=True)
    p.add_argument("--top", type=int, default=4)
    p.add_argument("--png", default=None, help="write the heat map here")
    args = p.parse_args(argv)
    quiet_without_tpu()  # libtpu installed, no TPU here: no libtpu errors

    from qtarget_jax.evaluate.loading import load_source
    from qtarget_jax.targets import get_preset

    spec = get_preset(args.preset, **_knobs(args.knob))
    model, tokenizer = load_source(args.model)
    teacher = None
    if spec.needs_teacher:
        teacher = model if args.teacher is None else load_source(args.teacher)[0]
    rows = target_lens(model, tokenizer, spec, args.prompt, args.response, teacher=teacher,
                       top=args.top)
    knobs = ", ".join(args.knob)
    title = (f"target lens: model={args.model} preset={args.preset} {knobs} "
             f"teacher={args.teacher or ('model itself' if spec.needs_teacher else 'none')}")
    print(title)
    print(render_table(rows))
    if args.png:
        plot_lens(rows, args.png, title)
        print(f"wrote {args.png}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
