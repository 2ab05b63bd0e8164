"""libtpu's environment on a host without a TPU chip (a CPU or GPU machine with `.[tpu]`).

Installed, libtpu is loaded by every JAX program that has not set JAX_PLATFORMS. On a host
with no TPU chip it looks for the TPU VM it runs on (metadata server, worker list) and prints
half a screen of errors before JAX falls back to the CPU or GPU. Naming this host as the only
worker, of some accelerator type, answers those questions; the planner (train/plan.py) also
compiles for TPU slices that way. Both functions only set variables the user has not set,
and `quiet_without_tpu` changes nothing on a host that has a TPU chip.
"""
from __future__ import annotations

import glob
import os

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are Google PCI devices (as JAX's own check reads)


def has_tpu_chip() -> bool:
    """True when a Google PCI device (a TPU chip) is attached to this host."""
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path, encoding="ascii") as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def answer_libtpu(accelerator_type: str) -> None:
    """Tell libtpu it runs alone on this host, as `accelerator_type` (e.g. "v5p-8"): no
    metadata server, this host the only worker, and no lockfile shared with other processes
    (no chip is opened). Must run before JAX first initialises its backends."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)


def quiet_without_tpu() -> None:
    """For programs' entry points: on a host with no TPU chip, where libtpu would only print
    errors and let JAX fall back, answer it first. Nothing happens on a TPU host or when the
    user chose JAX_PLATFORMS."""
    if os.environ.get("JAX_PLATFORMS") or has_tpu_chip():
        return
    answer_libtpu("v5p-8")
