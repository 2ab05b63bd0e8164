"""Fine-tune a decoder with a Q-target loss.

Usage:
  python train.py --config configs/smollm2_target_sft.yaml [key=value ...]
  python train.py --config configs/tiny_test.yaml optim.lr=3e-4 run.dir=runs/try

Layering: configs/base.yaml <- configs/models/<model.name>.yaml <- --config <- key=value.
This file is intentionally short; the logic lives in qtarget_jax.train (tested there).
"""
import argparse
import logging
import sys

from qtarget_jax.config import ConfigError, check_sources, load_config
from qtarget_jax.libtpu_env import quiet_without_tpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="job YAML (layered over base.yaml and models/<name>.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value, e.g. optim.lr=3e-4")
    args = ap.parse_args(argv)
    quiet_without_tpu()  # libtpu installed, no TPU here: no libtpu errors
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file at INFO
    try:
        loaded = load_config(args.config, tuple(args.overrides))
        check_sources(loaded.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from qtarget_jax.train.compile_cache import enable_persistent_cache
    from qtarget_jax.train.loop import run  # imports jax: after the config is known good
    from qtarget_jax.train.summary import summary_lines, write_summary
    enable_persistent_cache()  # $QTARGET_JAX_COMPILE_CACHE or ~/.cache/qtarget_jax/jax
    result = run(loaded)
    write_summary(result, loaded.config)  # <run.dir>/summary.json, for scripts
    print("\n".join(summary_lines(result, loaded.config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
