"""Shared pieces of the tpu_scripts/ tests: reference settings and a fake `gcloud`.

The fake gcloud (a bash script: starts in milliseconds) appends its argv to `calls` (each
argument ends with the unit separator 0x1f, each call with the record separator 0x1e) and
answers from files in its folder:
  states        one state per line; each `describe` consumes the first line, the last one
                sticks. ABSENT (or no file) -> NOT_FOUND error; DENIED -> PERMISSION_DENIED.
  ssh_failures  integer: that many next ssh/scp calls fail with exit 255 (transient).
  create_failures  integer: that many next `create` calls fail (no capacity).
  train_status  the line `ssh ... train_status.sh` prints (default "running 123").
No network, no real gcloud: the fake folder comes first on PATH.
"""
from __future__ import annotations

import dataclasses
import pathlib
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tpu_scripts"

# Settings of the two reference set-ups the tests pin exact command lines for.
V5E_8 = {
    "PROJECT": "qt-proj",
    "ZONE": "us-west4-a",
    "ACCELERATOR_TYPE": "v5litepod-8",
    "RUNTIME_VERSION": "v2-alpha-tpuv5-lite",
    "TPU_NAME": "qt-v5e-8",
    "GCS_BUCKET": "qt-bucket",
    "PROVISIONING": "spot",
}
V5P_64 = {
    "PROJECT": "qt-proj",
    "ZONE": "us-east5-a",
    "ACCELERATOR_TYPE": "v5p-64",
    "RUNTIME_VERSION": "v2-alpha-tpuv5",
    "TPU_NAME": "qt-v5p-64",
    "GCS_BUCKET": "qt-bucket",
    "PROVISIONING": "reserved",
    "QUEUED": "true",
    "RUN_NAME": "llama3-8b-sft",
}

FAKE_GCLOUD = r'''#!/usr/bin/env bash
# Fake gcloud for tests (bash: starts in milliseconds). Records argv, answers from files.
d=$(cd "$(dirname "$0")" && pwd)
{
  printf '%s\x1f' "$@"
  printf '\x1e'
} >>"$d/calls"
case ${4:-} in
  describe)
    states=()
    [[ -f $d/states ]] && mapfile -t states <"$d/states"
    state=${states[0]:-ABSENT}
    if ((${#states[@]} > 1)); then printf '%s\n' "${states[@]:1}" >"$d/states"; fi
    case $state in
      ABSENT) echo "ERROR: (gcloud.compute.tpus.describe) NOT_FOUND: $5 was not found" >&2
        exit 1 ;;
      DENIED) echo "ERROR: (gcloud) PERMISSION_DENIED: missing tpu.nodes.get" >&2
        exit 1 ;;
    esac
    echo "$state"
    ;;
  create)
    failures=$(cat "$d/create_failures" 2>/dev/null || echo 0)
    if ((failures > 0)); then
      echo $((failures - 1)) >"$d/create_failures"
      echo "ERROR: (gcloud.compute.tpus.tpu-vm.create) There is no more capacity in the zone" >&2
      exit 1
    fi
    ;;
  ssh | scp)
    failures=$(cat "$d/ssh_failures" 2>/dev/null || echo 0)
    if ((failures > 0)); then
      echo $((failures - 1)) >"$d/ssh_failures"
      echo "ssh: connect to host 10.0.0.2 port 22: Connection timed out" >&2
      exit 255
    fi
    for a in "$@"; do
      case $a in
        --command=*tail*-F*)  # logs --follow: stream until Ctrl-C, then exit 1 as gcloud does
          # The trap is in place before the test is told we follow. Short foreground sleeps,
          # not one background sleep and `wait`: bash can miss a SIGINT that lands just before
          # `wait` blocks (it then sleeps the 30 s out), while a foreground sleep dies with the
          # group's SIGINT and the trap runs as soon as it has. Not stopped: exit 0 after 30 s.
          trap 'exit 1' INT
          touch "$d/following"
          for ((i = 0; i < 600; i++)); do sleep 0.05; done
          ;;
        --command=*train_status.sh*) cat "$d/train_status" 2>/dev/null || echo "running 123" ;;
        --output-directory=*)
          for w in 0 1; do echo "log of worker $w" >"${a#--output-directory=}/$w.log"; done ;;
      esac
    done
    ;;
esac
'''


@dataclasses.dataclass
class FakeGcloud:
    """Handle on the fake gcloud folder: set its answers, read the calls it recorded."""
    dir: pathlib.Path

    def set_states(self, *states: str) -> None:
        (self.dir / "states").write_text("\n".join(states) + "\n")

    def set_ssh_failures(self, n: int) -> None:
        (self.dir / "ssh_failures").write_text(str(n))

    def set_create_failures(self, n: int) -> None:
        (self.dir / "create_failures").write_text(str(n))

    def set_train_status(self, line: str) -> None:
        (self.dir / "train_status").write_text(line + "\n")

    def calls(self) -> list[list[str]]:
        path = self.dir / "calls"
        if not path.exists():
            return []
        return [record.split("\x1f")[:-1] for record in path.read_text().split("\x1e")[:-1]]


def write_settings(path: pathlib.Path, settings: dict[str, str]) -> pathlib.Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    return path


def dry_lines(proc: subprocess.CompletedProcess, other: tuple[str, ...] = ()) -> list[str]:
    """The command lines a --dry-run printed, without the prefix. Any other stdout line must be
    listed in `other` (status.sh prints the state), else the test fails."""
    out, rest = [], []
    for line in proc.stdout.splitlines():
        if line.startswith("[dry-run] "):
            out.append(line[len("[dry-run] "):])
        else:
            rest.append(line)
    assert rest == list(other), f"unexpected stdout lines: {rest}"
    return out
