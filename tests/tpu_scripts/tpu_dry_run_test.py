"""--dry-run prints the exact gcloud/ssh command lines, and runs none of them.

The expected lines are written out by hand for a v5e-8 single host (TPU VM, spot) and a v5p-64
pod (queued resource on reserved capacity): a change here changes what users run on GCP.
"""
from __future__ import annotations

import pytest
from tpu_helpers import REPO, SCRIPTS, V5E_8, V5P_64, dry_lines

V5E_WHERE = "--project=qt-proj --zone=us-west4-a"
V5P_WHERE = "--project=qt-proj --zone=us-east5-a"
V5E_SSH = f"gcloud compute tpus tpu-vm ssh qt-v5e-8 {V5E_WHERE} --worker=all --quiet"
V5P_SSH = f"gcloud compute tpus tpu-vm ssh qt-v5p-64 {V5P_WHERE} --worker=all --quiet"
V5E_DESCRIBE = (f"gcloud compute tpus tpu-vm describe qt-v5e-8 {V5E_WHERE} "
                "'--format=value(state)'")
V5P_DESCRIBE = (f"gcloud compute tpus queued-resources describe qt-v5p-64 {V5P_WHERE} "
                "'--format=value(state.state)'")
TAR_EXCLUDES = ("--exclude=./.git --exclude=./.venv --exclude=./runs --exclude=./data_cache "
                "--exclude=./tpu_scripts/settings.env --exclude=__pycache__ "
                "--exclude=.pytest_cache --exclude=.hypothesis '--exclude=*.egg-info'")
CONFIG = "configs/base.yaml"  # any config that exists in the repo: run.sh checks it

# (script, args) -> expected lines; {stage} is the local staging folder of the test.
EXPECTED = {
    "v5e-8": {
        ("create", ()): [
            V5E_DESCRIBE,
            f"gcloud compute tpus tpu-vm create qt-v5e-8 {V5E_WHERE} "
            "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite --spot",
            V5E_DESCRIBE,
        ],
        ("sync", ()): [
            "mkdir -p {stage}",
            f"tar -czf {{stage}}/code.tar.gz {TAR_EXCLUDES} -C {REPO} .",
            f"gcloud compute tpus tpu-vm scp {{stage}}/code.tar.gz qt-v5e-8:qtarget-code.tar.gz "
            f"{V5E_WHERE} --worker=all --quiet",
            f"{V5E_SSH} '--command=mkdir -p qtarget-jax && find qtarget-jax -mindepth 1 "
            "-maxdepth 1 ! -name .venv ! -name runs -exec rm -rf {} + && "
            "tar -xzf qtarget-code.tar.gz -C qtarget-jax && rm qtarget-code.tar.gz'",
        ],
        ("setup", ()): [
            f"{V5E_SSH} '--command=bash qtarget-jax/tpu_scripts/remote/setup_worker.sh "
            "3.11 0.10.2'",
        ],
        ("run", ("--config", CONFIG, "run.steps=20", "optim.lr=3e-5")): [
            f"{V5E_SSH} '--command=bash qtarget-jax/tpu_scripts/remote/launch.sh "
            f"--launch-id L1 {CONFIG} run.dir=runs/qt-v5e-8 "
            "checkpoint.dir=gs://qt-bucket/runs/qt-v5e-8/checkpoints run.steps=20 optim.lr=3e-5'",
        ],
        ("logs", ()): [
            "mkdir -p {stage}/logs",
            f"{V5E_SSH} '--command=tail -n 2000 qtarget-logs/train.log' "
            "--output-directory={stage}/logs",
        ],
        ("logs", ("--follow", "--worker", "0")): [
            "gcloud compute tpus tpu-vm ssh qt-v5e-8 --project=qt-proj --zone=us-west4-a "
            "--worker=0 --quiet '--command=tail -n 100 -F qtarget-logs/train.log'",
        ],
        ("stop", ()): [
            f"{V5E_SSH} '--command=bash qtarget-jax/tpu_scripts/remote/stop_train.sh 120'",
        ],
        ("status", ("--no-workers",)): [V5E_DESCRIBE],
        ("exec", ("--", "gcloud storage cp -r gs://qt-bucket/llama3-8b ~/models/")): [
            f"{V5E_SSH} '--command=gcloud storage cp -r gs://qt-bucket/llama3-8b ~/models/'",
        ],
        ("delete", ()): [
            V5E_DESCRIBE,
            f"gcloud compute tpus tpu-vm delete qt-v5e-8 {V5E_WHERE} --quiet",
        ],
    },
    "v5p-64": {
        ("create", ()): [
            V5P_DESCRIBE,
            f"gcloud compute tpus queued-resources create qt-v5p-64 {V5P_WHERE} "
            "--node-id=qt-v5p-64 --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 "
            "--reserved",
            V5P_DESCRIBE,
        ],
        ("setup", ()): [
            f"{V5P_SSH} '--command=bash qtarget-jax/tpu_scripts/remote/setup_worker.sh "
            "3.11 0.10.2'",
        ],
        ("run", ("--config", CONFIG, "mesh.fsdp=-1", "mesh.data=1")): [
            f"{V5P_SSH} '--command=bash qtarget-jax/tpu_scripts/remote/launch.sh "
            f"--launch-id L1 {CONFIG} run.dir=runs/llama3-8b-sft "
            "checkpoint.dir=gs://qt-bucket/runs/llama3-8b-sft/checkpoints "
            "mesh.fsdp=-1 mesh.data=1'",
        ],
        ("stop", ("--grace-s", "300")): [
            f"{V5P_SSH} '--command=bash qtarget-jax/tpu_scripts/remote/stop_train.sh 300'",
        ],
        ("status", ()): [
            V5P_DESCRIBE,
            f"{V5P_SSH} '--command=echo $(hostname): $(bash "
            "qtarget-jax/tpu_scripts/remote/train_status.sh)'",
        ],
        ("exec", ("--worker", "3", "--", "df -h /")): [
            "gcloud compute tpus tpu-vm ssh qt-v5p-64 --project=qt-proj --zone=us-east5-a "
            "--worker=3 --quiet '--command=df -h /'",
        ],
        ("delete", ()): [
            V5P_DESCRIBE,
            f"gcloud compute tpus queued-resources delete qt-v5p-64 {V5P_WHERE} --force --quiet",
        ],
    },
}
SETTINGS = {"v5e-8": V5E_8, "v5p-64": V5P_64}
CASES = [(setup, script, args) for setup, table in EXPECTED.items() for script, args in table]


@pytest.mark.parametrize("setup,script,args", CASES,
                         ids=[f"{s}-{n}-{'_'.join(a) or 'default'}" for s, n, a in CASES])
def test_dry_run_prints_exact_commands_and_runs_none(setup, script, args, settings_file,
                                                     run_script, fake_gcloud):
    settings = settings_file(SETTINGS[setup])
    proc = run_script(script, "--settings", str(settings), "--dry-run", *args)
    assert proc.returncode == 0, proc.stderr
    expected = [line.replace("{stage}", str(run_script.stage))
                for line in EXPECTED[setup][(script, args)]]
    other = ()
    if script == "status":  # the state line; dry-run answers the ready state
        name, acc = SETTINGS[setup]["TPU_NAME"], SETTINGS[setup]["ACCELERATOR_TYPE"]
        other = (f"{name} {acc} {'ACTIVE' if setup == 'v5p-64' else 'READY'}",)
    assert dry_lines(proc, other) == expected
    assert fake_gcloud.calls() == [], "--dry-run must not call gcloud"
    assert not run_script.stage.exists(), "--dry-run must not write local files"


def test_relaunch_dry_run_is_delete_create_sync_setup_run_in_order(settings_file, run_script):
    settings = settings_file(V5P_64)
    proc = run_script("relaunch", "--settings", str(settings), "--dry-run", "--config", CONFIG)
    assert proc.returncode == 0, proc.stderr
    lines = dry_lines(proc)
    table = EXPECTED["v5p-64"]
    sync = [line.replace("qt-v5e-8", "qt-v5p-64").replace(V5E_WHERE, V5P_WHERE)
            .replace("{stage}", str(run_script.stage)) for line in EXPECTED["v5e-8"][("sync", ())]]
    run = [f"{V5P_SSH} '--command=bash qtarget-jax/tpu_scripts/remote/launch.sh "
           f"--launch-id L1 {CONFIG} run.dir=runs/llama3-8b-sft "
           "checkpoint.dir=gs://qt-bucket/runs/llama3-8b-sft/checkpoints'"]
    assert lines == [V5P_DESCRIBE, table[("delete", ())][1]] + table[("create", ())] + sync + \
        table[("setup", ())] + run


def test_watch_dry_run_shows_one_relaunch(settings_file, run_script):
    settings = settings_file(V5E_8)
    proc = run_script("watch", "--settings", str(settings), "--dry-run", "--config", CONFIG)
    assert proc.returncode == 0, proc.stderr
    lines = dry_lines(proc)
    assert lines[0] == V5E_DESCRIBE
    assert sum("tpu-vm create qt-v5e-8" in line for line in lines) == 1
    assert lines[-1].endswith(f"launch.sh --launch-id L1 {CONFIG} run.dir=runs/qt-v5e-8 "
                              "checkpoint.dir=gs://qt-bucket/runs/qt-v5e-8/checkpoints'")
    assert "relaunch 1/20" in proc.stderr


ALL_SCRIPTS = sorted(p.stem for p in SCRIPTS.glob("*.sh") if p.name != "common.sh")


def test_every_script_is_covered_by_a_dry_run_test():
    covered = {script for _, script, _ in CASES} | {"relaunch", "watch"}
    assert covered == set(ALL_SCRIPTS)


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_help_needs_no_settings(script, run_script, env_without_settings):
    proc = run_script(script, "--help", env=env_without_settings)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{script}.sh: ")
    assert "Usage: tpu_scripts/" in proc.stdout and "Example Usage: " in proc.stdout
    assert "set -euo pipefail" not in proc.stdout
