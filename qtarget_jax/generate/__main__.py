"""Talk to a model: the answer to a prompt, streamed to stdout as it is generated.

    python -m qtarget_jax.generate --model smollm2 "What is 7 + 5?"
    python -m qtarget_jax.generate --model runs/smollm2_target_sft       # one prompt per line
    python -m qtarget_jax.generate --model model.gguf --temperature 0.7 --top-p 0.9 --seed 1 "Hi"

--model takes what the config's model.source takes: "smollm2", a .gguf file, a Hugging Face
folder, or a training run folder (its exported hf/ folder when the run finished, LoRA merged;
else its latest checkpoint). Without a prompt argument, every line read from stdin is a prompt
until an empty line or end of input. The prompt is one user turn under the model's chat
template. Bad input (a missing model, an empty prompt, a prompt longer than the context) gets
one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from qtarget_jax.generate.sampling import SamplingConfig
from qtarget_jax.generate.stream import stream
from qtarget_jax.libtpu_env import quiet_without_tpu


def load(source: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a model source or a training run folder."""
    from qtarget_jax.evaluate.loading import load_checkpoint, load_source
    from qtarget_jax.train.build import resolve_source
    resolved = resolve_source(source)
    run_folder = os.path.isfile(os.path.join(source, "config.yaml"))
    if resolved == source and run_folder:        # a run that has not exported: its checkpoint
        model, tokenizer, _ = load_checkpoint(source)
        return model, tokenizer
    if source != "smollm2" and not os.path.exists(resolved):
        raise FileNotFoundError(f"--model {source}: no such file or folder")
    return load_source(resolved)


def answer(model: Any, tokenizer: Any, prompt: str, config: SamplingConfig, seed: int) -> None:
    """Streams the answer to stdout, then a newline."""
    if not prompt.strip():
        raise ValueError("empty prompt")
    for delta in stream(model, tokenizer, prompt, config, seed=seed):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit code (0, or 2 on bad input)."""
    ap = argparse.ArgumentParser(prog="python -m qtarget_jax.generate",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="smollm2, a .gguf, an HF folder or a run folder")
    ap.add_argument("prompt", nargs="?", help="the prompt (default: read lines from stdin)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = ap.parse_args(argv)
    quiet_without_tpu()  # libtpu installed, no TPU here: no libtpu errors
    try:
        config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p)
        if args.prompt is not None and not args.prompt.strip():
            raise ValueError("empty prompt")
        model, tokenizer = load(args.model)
        if args.prompt is not None:
            answer(model, tokenizer, args.prompt, config, args.seed)
            return 0
        for line in sys.stdin:
            if not line.strip():
                break
            answer(model, tokenizer, line.rstrip("\n"), config, args.seed)
    except (ValueError, TypeError, FileNotFoundError) as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
