"""The scripts against a fake `gcloud` that records its argv: exact argument lists, idempotent
re-runs, retries of flaky ssh, preemption detected and relaunched, clear errors."""
from __future__ import annotations

import os
import signal
import tarfile
import time

import pytest
from tpu_helpers import V5E_8, V5P_64

V5E_DESCRIBE = ["compute", "tpus", "tpu-vm", "describe", "qt-v5e-8", "--project=qt-proj",
                "--zone=us-west4-a", "--format=value(state)"]
V5P_DESCRIBE = ["compute", "tpus", "queued-resources", "describe", "qt-v5p-64",
                "--project=qt-proj", "--zone=us-east5-a", "--format=value(state.state)"]
V5E_CREATE = ["compute", "tpus", "tpu-vm", "create", "qt-v5e-8", "--project=qt-proj",
              "--zone=us-west4-a", "--accelerator-type=v5litepod-8",
              "--version=v2-alpha-tpuv5-lite", "--spot"]
V5P_CREATE = ["compute", "tpus", "queued-resources", "create", "qt-v5p-64", "--project=qt-proj",
              "--zone=us-east5-a", "--node-id=qt-v5p-64", "--accelerator-type=v5p-64",
              "--runtime-version=v2-alpha-tpuv5", "--reserved"]
V5E_SSH = ["compute", "tpus", "tpu-vm", "ssh", "qt-v5e-8", "--project=qt-proj",
           "--zone=us-west4-a"]
CONFIG = "configs/base.yaml"


def test_create_v5e_8_polls_until_ready(settings_file, run_script, fake_gcloud):
    fake_gcloud.set_states("ABSENT", "CREATING", "CREATING", "READY")
    proc = run_script("create", "--settings", str(settings_file(V5E_8)))
    assert proc.returncode == 0, proc.stderr
    assert fake_gcloud.calls() == [V5E_DESCRIBE, V5E_CREATE] + [V5E_DESCRIBE] * 3
    assert "qt-v5e-8 is READY" in proc.stderr


def test_create_v5p_64_queued_waits_for_active(settings_file, run_script, fake_gcloud):
    fake_gcloud.set_states("ABSENT", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE")
    proc = run_script("create", "--settings", str(settings_file(V5P_64)))
    assert proc.returncode == 0, proc.stderr
    assert fake_gcloud.calls() == [V5P_DESCRIBE, V5P_CREATE] + [V5P_DESCRIBE] * 3


@pytest.mark.parametrize("provisioning,flags", [("on-demand", []), ("spot", ["--spot"]),
                                                ("preemptible", ["--preemptible"]),
                                                ("reserved", ["--reserved"])])
def test_create_provisioning_flags(provisioning, flags, settings_file, run_script, fake_gcloud):
    fake_gcloud.set_states("ABSENT")
    settings = settings_file({**V5E_8, "PROVISIONING": provisioning})
    proc = run_script("create", "--settings", str(settings), "--no-wait")
    assert proc.returncode == 0, proc.stderr
    assert fake_gcloud.calls() == [V5E_DESCRIBE, V5E_CREATE[:-1] + flags]


def test_create_waits_for_a_delete_in_progress(settings_file, run_script, fake_gcloud):
    fake_gcloud.set_states("DELETING", "DELETING", "ABSENT", "ACTIVE")
    proc = run_script("create", "--settings", str(settings_file(V5P_64)))
    assert proc.returncode == 0, proc.stderr
    assert fake_gcloud.calls() == [V5P_DESCRIBE] * 3 + [V5P_CREATE, V5P_DESCRIBE]
    assert "qt-v5p-64 is being deleted" in proc.stderr


def test_create_again_is_reported_not_a_crash(settings_file, run_script, fake_gcloud):
    fake_gcloud.set_states("READY")
    proc = run_script("create", "--settings", str(settings_file(V5E_8)))
    assert proc.returncode == 0, proc.stderr
    assert "qt-v5e-8 already exists (state READY): not creating it again" in proc.stderr
    assert fake_gcloud.calls() == [V5E_DESCRIBE, V5E_DESCRIBE]


@pytest.mark.parametrize("settings,state", [(V5E_8, "PREEMPTED"), (V5P_64, "SUSPENDED")])
def test_create_on_a_lost_tpu_points_to_relaunch(settings, state, settings_file, run_script,
                                                 fake_gcloud):
    fake_gcloud.set_states(state)
    proc = run_script("create", "--settings", str(settings_file(settings)))
    assert proc.returncode == 1
    assert f"exists but is {state}" in proc.stderr and "relaunch.sh" in proc.stderr
    assert len(fake_gcloud.calls()) == 1


def test_wait_fails_when_preempted_while_creating(settings_file, run_script, fake_gcloud):
    fake_gcloud.set_states("ABSENT", "CREATING", "PREEMPTED")
    proc = run_script("create", "--settings", str(settings_file(V5E_8)))
    assert proc.returncode == 1
    assert "qt-v5e-8 is PREEMPTED while waiting for READY" in proc.stderr


def test_wait_timeout_names_the_state(settings_file, run_script, fake_gcloud):
    fake_gcloud.set_states("ABSENT", "CREATING")
    proc = run_script("create", "--settings", str(settings_file(V5E_8)), "--timeout-s", "0")
    assert proc.returncode == 1
    assert "still CREATING after 0s" in proc.stderr


def test_gcloud_error_other_than_not_found_is_reported(settings_file, run_script, fake_gcloud):
    fake_gcloud.set_states("DENIED")
    proc = run_script("create", "--settings", str(settings_file(V5E_8)))
    assert proc.returncode == 1
    assert "PERMISSION_DENIED" in proc.stderr
    assert "could not read the state of qt-v5e-8" in proc.stderr
    assert len(fake_gcloud.calls()) == 1, "must not go on and create after a failed query"


def test_delete_absent_is_reported_not_a_crash(settings_file, run_script, fake_gcloud):
    fake_gcloud.set_states("ABSENT")
    proc = run_script("delete", "--settings", str(settings_file(V5P_64)))
    assert proc.returncode == 0, proc.stderr
    assert "does not exist in us-east5-a: nothing to delete" in proc.stderr
    assert fake_gcloud.calls() == [V5P_DESCRIBE]


def test_delete_queued_resource(settings_file, run_script, fake_gcloud):
    fake_gcloud.set_states("ACTIVE")
    proc = run_script("delete", "--settings", str(settings_file(V5P_64)))
    assert proc.returncode == 0, proc.stderr
    assert fake_gcloud.calls()[1] == ["compute", "tpus", "queued-resources", "delete",
                                      "qt-v5p-64", "--project=qt-proj", "--zone=us-east5-a",
                                      "--force", "--quiet"]


def test_ssh_is_retried_on_transient_failures(settings_file, run_script, fake_gcloud):
    fake_gcloud.set_ssh_failures(2)
    proc = run_script("stop", "--settings", str(settings_file(V5E_8)))
    assert proc.returncode == 0, proc.stderr
    stop = V5E_SSH + ["--worker=all", "--quiet",
                      "--command=bash qtarget-jax/tpu_scripts/remote/stop_train.sh 120"]
    assert fake_gcloud.calls() == [stop] * 3
    assert "attempt 1/5 failed (exit 255)" in proc.stderr
    assert "attempt 2/5 failed (exit 255)" in proc.stderr


def test_ssh_gives_up_after_ssh_retries(settings_file, run_script, fake_gcloud):
    fake_gcloud.set_ssh_failures(10)
    proc = run_script("setup", "--settings", str(settings_file({**V5E_8, "SSH_RETRIES": "3"})))
    assert proc.returncode == 255
    assert len(fake_gcloud.calls()) == 3
    assert "giving up after 3 attempts (exit 255)" in proc.stderr


def test_sync_tars_the_tree_and_copies_it_to_every_worker(settings_file, run_script,
                                                          fake_gcloud):
    proc = run_script("sync", "--settings", str(settings_file(V5E_8)))
    assert proc.returncode == 0, proc.stderr
    tarball = run_script.stage / "code.tar.gz"
    assert tarball.stat().st_size > 0
    scp, ssh = fake_gcloud.calls()
    assert scp == ["compute", "tpus", "tpu-vm", "scp", str(tarball),
                   "qt-v5e-8:qtarget-code.tar.gz", "--project=qt-proj", "--zone=us-west4-a",
                   "--worker=all", "--quiet"]
    assert ssh[:9] == V5E_SSH + ["--worker=all", "--quiet"]
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert "./tpu_scripts/remote/launch.sh" in names and "./pyproject.toml" in names
    assert not any(n.startswith(("./.git/", "./.venv/", "./runs/")) for n in names)


def test_logs_fetches_one_file_per_worker(settings_file, run_script, fake_gcloud):
    proc = run_script("logs", "--settings", str(settings_file(V5E_8)), "--lines", "50")
    assert proc.returncode == 0, proc.stderr
    out = run_script.stage / "logs"
    assert fake_gcloud.calls() == [V5E_SSH + [
        "--worker=all", "--quiet", "--command=tail -n 50 qtarget-logs/train.log",
        f"--output-directory={out}"]]
    assert sorted(p.name for p in out.iterdir()) == ["0.log", "1.log"]


def test_ctrl_c_stops_the_script_not_just_one_ssh_attempt(settings_file, run_script,
                                                          fake_gcloud):
    """SIGINT to the script's process group, as a terminal sends on Ctrl-C. The fake gcloud
    catches it and exits 1 as gcloud does; without the scripts' INT trap, qt_retry would take
    that for a failed ssh and try again."""
    proc = run_script("logs", "--settings", str(settings_file(V5E_8)), "--follow",
                      background=True)
    try:
        deadline = time.monotonic() + 60
        while not (fake_gcloud.dir / "following").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "--follow never started"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)  # the fake gives up by itself after 30 s
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "[logs] interrupted" in stderr
    assert len(fake_gcloud.calls()) == 1, "an interrupted ssh must not be retried"


def test_run_quotes_overrides_for_the_remote_shell(settings_file, run_script, fake_gcloud):
    proc = run_script("run", "--settings", str(settings_file(V5E_8)), "--config", CONFIG,
                      "data.path=gs://b/my data", "loss.target={preset: tsft}")
    assert proc.returncode == 0, proc.stderr
    (call,) = fake_gcloud.calls()
    assert call[-1] == ("--command=bash qtarget-jax/tpu_scripts/remote/launch.sh "
                        f"--launch-id L1 {CONFIG} run.dir=runs/qt-v5e-8 "
                        "checkpoint.dir=gs://qt-bucket/runs/qt-v5e-8/checkpoints "
                        "'data.path=gs://b/my data' 'loss.target={preset: tsft}'")


def test_preempted_spot_vm_is_relaunched_and_resumes(settings_file, run_script, fake_gcloud):
    # watch sees PREEMPTED -> relaunch: delete (sees PREEMPTED), create (ABSENT, then READY),
    # sync, setup, run with the same run folder (train.py resumes from its checkpoints).
    fake_gcloud.set_states("PREEMPTED", "PREEMPTED", "ABSENT", "READY")
    proc = run_script("watch", "--settings", str(settings_file(V5E_8)), "--once",
                      "--config", CONFIG, "run.steps=1000")
    assert proc.returncode == 0, proc.stderr
    calls = fake_gcloud.calls()
    verbs = [" ".join(c[2:4]) for c in calls]
    assert verbs == ["tpu-vm describe", "tpu-vm describe", "tpu-vm delete", "tpu-vm describe",
                     "tpu-vm create", "tpu-vm describe", "tpu-vm scp", "tpu-vm ssh",
                     "tpu-vm ssh", "tpu-vm ssh"]
    assert calls[2] == ["compute", "tpus", "tpu-vm", "delete", "qt-v5e-8", "--project=qt-proj",
                        "--zone=us-west4-a", "--quiet"]
    assert calls[4] == V5E_CREATE
    assert calls[-1][-1] == ("--command=bash qtarget-jax/tpu_scripts/remote/launch.sh "
                             f"--launch-id L1 {CONFIG} run.dir=runs/qt-v5e-8 "
                             "checkpoint.dir=gs://qt-bucket/runs/qt-v5e-8/checkpoints "
                             "run.steps=1000")
    assert "qt-v5e-8 is PREEMPTED: relaunch 1/20" in proc.stderr


def test_suspended_queued_resource_is_relaunched(settings_file, run_script, fake_gcloud):
    fake_gcloud.set_states("SUSPENDED", "SUSPENDED", "ABSENT", "ACTIVE")
    proc = run_script("watch", "--settings", str(settings_file(V5P_64)), "--once",
                      "--config", CONFIG)
    assert proc.returncode == 0, proc.stderr
    calls = fake_gcloud.calls()
    assert calls[4] == V5P_CREATE
    assert calls[-1][-1].endswith("checkpoint.dir=gs://qt-bucket/runs/llama3-8b-sft/checkpoints")


def test_watch_retries_a_relaunch_that_found_no_capacity(settings_file, run_script,
                                                         fake_gcloud):
    # Check 1: PREEMPTED -> relaunch: delete ok, create fails (no spot capacity).
    # Check 2: ABSENT after our failed relaunch -> relaunch again: create ok, READY, run.
    # Check 3: READY and worker 0 reports the run finished -> exit 0.
    fake_gcloud.set_states("PREEMPTED", "PREEMPTED", "ABSENT",
                           "ABSENT", "ABSENT", "ABSENT", "READY")
    fake_gcloud.set_create_failures(1)
    fake_gcloud.set_train_status("finished 0")
    proc = run_script("watch", "--settings", str(settings_file(V5E_8)), "--interval-s", "0",
                      "--config", CONFIG)
    assert proc.returncode == 0, proc.stderr
    assert "relaunch 1 failed (exit 1); trying again at the next check" in proc.stderr
    assert "qt-v5e-8 is ABSENT: relaunch 2/20" in proc.stderr
    assert "run finished on worker 0 after 2 relaunch(es)" in proc.stderr
    verbs = [c[3] for c in fake_gcloud.calls()]
    assert verbs.count("create") == 2 and verbs.count("delete") == 1


def test_watch_once_reports_a_failed_relaunch(settings_file, run_script, fake_gcloud):
    fake_gcloud.set_states("PREEMPTED", "PREEMPTED", "ABSENT")
    fake_gcloud.set_create_failures(1)
    proc = run_script("watch", "--settings", str(settings_file(V5E_8)), "--once",
                      "--config", CONFIG)
    assert proc.returncode == 1
    assert "There is no more capacity in the zone" in proc.stderr


def test_watch_stops_when_the_tpu_was_deleted_on_purpose(settings_file, run_script,
                                                        fake_gcloud):
    fake_gcloud.set_states("ABSENT")
    proc = run_script("watch", "--settings", str(settings_file(V5E_8)), "--once",
                      "--config", CONFIG)
    assert proc.returncode == 1
    assert "qt-v5e-8 does not exist" in proc.stderr
    assert len(fake_gcloud.calls()) == 1


def test_watch_gives_up_after_max_relaunches(settings_file, run_script, fake_gcloud):
    fake_gcloud.set_states("PREEMPTED")
    proc = run_script("watch", "--settings", str(settings_file(V5E_8)), "--once",
                      "--max-relaunches", "0", "--config", CONFIG)
    assert proc.returncode == 1
    assert "--max-relaunches 0 is used up" in proc.stderr


@pytest.mark.parametrize("status,rc,message", [
    ("finished 0", 0, "run finished on worker 0"),
    ("failed 1", 1, "worker 0 reports 'failed 1': not relaunching"),
    ("stopped", 1, "worker 0 reports 'stopped'"),
    ("running 4242", 0, "qt-v5e-8 READY, worker 0: running 4242"),
])
def test_watch_reads_the_run_state_of_worker_0(status, rc, message, settings_file, run_script,
                                               fake_gcloud):
    fake_gcloud.set_states("READY")
    fake_gcloud.set_train_status(status)
    proc = run_script("watch", "--settings", str(settings_file(V5E_8)), "--once",
                      "--config", CONFIG)
    assert proc.returncode == rc, proc.stderr
    assert message in proc.stderr
    assert fake_gcloud.calls()[-1][4:7] == ["qt-v5e-8", "--project=qt-proj", "--zone=us-west4-a"]
    assert "--worker=0" in fake_gcloud.calls()[-1]


@pytest.mark.parametrize("state,rc", [("READY", 0), ("PREEMPTED", 3), ("ABSENT", 4),
                                      ("CREATING", 5)])
def test_status_exit_codes(state, rc, settings_file, run_script, fake_gcloud):
    fake_gcloud.set_states(state)
    proc = run_script("status", "--settings", str(settings_file(V5E_8)), "--no-workers")
    assert proc.returncode == rc, proc.stderr
    assert proc.stdout == f"qt-v5e-8 v5litepod-8 {state}\n"
