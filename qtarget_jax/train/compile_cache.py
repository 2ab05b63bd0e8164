"""Compiled programs kept across runs: JAX's persistent cache on disk, and train/eval steps
reused within one process.

On disk: `enable_persistent_cache()` points `jax_compilation_cache_dir` at
`$QTARGET_JAX_COMPILE_CACHE` (default `~/.cache/qtarget_jax/jax`, under `$XDG_CACHE_HOME` when
set; `off` disables it). train.py, experiments/run.py and the tests call it. JAX keys each entry
by the program's HLO, compile options, backend and jax/jaxlib versions, so an entry is only ever
used for the program that made it; an entry that cannot be read is recompiled (JAX warns), so the
cache changes start-up time, never a result. jax's own `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`
(default 1 s) decides which programs are worth an entry.

In process: `reuse(key, make)` returns the jitted step made earlier for an equal `key` (one
whose Python constants, i.e. graphdefs, loss, optimizer and shardings, are equal), so a second
run of the same shapes skips tracing, lowering and compiling altogether.
"""
from __future__ import annotations

import collections
import logging
import os
import pathlib
from typing import Any, Callable, Optional

ENV = "QTARGET_JAX_COMPILE_CACHE"
log = logging.getLogger("qtarget_jax.train")


def cache_dir() -> Optional[pathlib.Path]:
    """The persistent cache folder: $QTARGET_JAX_COMPILE_CACHE, else <user cache>/qtarget_jax/jax;
    None when the variable is `off` (or empty)."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none") else \
            pathlib.Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "qtarget_jax" / "jax"


def enable_persistent_cache(folder: Optional[str | os.PathLike] = None) -> Optional[str]:
    """Sets JAX's persistent compilation cache to `folder` (default: `cache_dir()`); returns
    the folder used, or None when disabled. Safe to call more than once."""
    import jax
    path = pathlib.Path(folder) if folder is not None else cache_dir()
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    return str(path)


_MAX_KEPT = 8  # jitted steps held (each keeps its executables alive)
_kept: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()


def reuse(key: Any, make: Callable[[], Any]) -> Any:
    """`make()`'s result, made once per equal `key` in this process (the most recent
    `_MAX_KEPT` kept); a key that cannot be hashed is never shared."""
    try:
        hash(key)
    except TypeError:
        return make()
    if key in _kept:
        _kept.move_to_end(key)
        return _kept[key]
    _kept[key] = value = make()
    while len(_kept) > _MAX_KEPT:
        _kept.popitem(last=False)
    return value


def clear() -> None:
    """Forgets the steps kept in process (tests; a caller that wants a cold start)."""
    _kept.clear()
