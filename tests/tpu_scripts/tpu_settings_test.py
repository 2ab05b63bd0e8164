"""Settings loading: clear errors naming the file, line, key and value; comments and quotes;
the example file is complete and valid; shellcheck is clean."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from tpu_helpers import REPO, SCRIPTS, V5E_8, dry_lines


def _create(run_script, settings, *args):
    return run_script("create", "--settings", str(settings), "--dry-run", "--no-wait", *args)


def test_missing_settings_file_says_how_to_make_one(run_script, tmp_path):
    proc = _create(run_script, tmp_path / "nope.env")
    assert proc.returncode == 1
    assert f"settings file not found: {tmp_path / 'nope.env'}" in proc.stderr
    assert "settings.example.env" in proc.stderr


def test_qt_settings_env_var_selects_the_file(run_script, settings_file):
    path = settings_file(V5E_8)
    proc = run_script("create", "--dry-run", "--no-wait", env={"QT_SETTINGS": str(path)})
    assert proc.returncode == 0, proc.stderr
    assert "qt-v5e-8" in proc.stdout


def test_missing_required_keys_are_all_named(run_script, settings_file):
    partial = {k: v for k, v in V5E_8.items() if k not in ("ZONE", "GCS_BUCKET")}
    path = settings_file(partial)
    proc = _create(run_script, path)
    assert proc.returncode == 1
    assert f"{path}: missing required setting(s): ZONE GCS_BUCKET" in proc.stderr


def test_empty_required_value_counts_as_missing(run_script, settings_file):
    proc = _create(run_script, settings_file({**V5E_8, "PROJECT": ""}))
    assert proc.returncode == 1
    assert "missing required setting(s): PROJECT" in proc.stderr


@pytest.mark.parametrize("line,message", [
    ("ZONES=us-west4-a", ":8: unknown key 'ZONES'"),
    ("ZONE=europe-west4-a", ":8: key 'ZONE' already set on line 2"),
    ("this is not a setting", ":8: expected KEY=VALUE, got: this is not a setting"),
    ("zone=x", ":8: expected KEY=VALUE, got: zone=x"),
])
def test_bad_lines_name_file_and_line(line, message, run_script, settings_file):
    path = settings_file(V5E_8)
    path.write_text(path.read_text() + line + "\n")
    proc = _create(run_script, path)
    assert proc.returncode == 1
    assert f"{path}{message}" in proc.stderr


@pytest.mark.parametrize("key,value,message", [
    ("ACCELERATOR_TYPE", "v5e8", "ACCELERATOR_TYPE='v5e8': expected e.g. v4-8"),
    ("PROVISIONING", "cheap", "PROVISIONING='cheap': must be one of on-demand, spot"),
    ("QUEUED", "yes", "QUEUED='yes': must be true or false"),
    ("GCS_BUCKET", "gs://qt-bucket", "GCS_BUCKET='gs://qt-bucket': give the bucket name only"),
    ("TPU_NAME", "My_TPU", "TPU_NAME='My_TPU': use lowercase letters"),
    ("SSH_RETRIES", "0", "SSH_RETRIES='0': must be a positive integer"),
    ("REMOTE_DIR", "/abs/path", "REMOTE_DIR='/abs/path': use a relative path"),
])
def test_bad_values_name_key_and_value(key, value, message, run_script, settings_file):
    proc = _create(run_script, settings_file({**V5E_8, key: value}))
    assert proc.returncode == 1
    assert message in proc.stderr


def test_preemptible_queued_resource_is_rejected(run_script, settings_file):
    proc = _create(run_script, settings_file({**V5E_8, "QUEUED": "true",
                                              "PROVISIONING": "preemptible"}))
    assert proc.returncode == 1
    assert "PROVISIONING=preemptible is not available for queued resources" in proc.stderr


def test_comments_blanks_and_quotes(run_script, tmp_path):
    path = tmp_path / "s.env"
    path.write_text(
        "# a comment\n\n"
        "  PROJECT=qt-proj   # trailing comment\n"
        'ZONE="us-west4-a"\n'
        "ACCELERATOR_TYPE='v5litepod-8'\n"
        "RUNTIME_VERSION=v2-alpha-tpuv5-lite\n"
        "TPU_NAME=qt-v5e-8\n"
        "GCS_BUCKET=qt-bucket\n"
        "RUN_NAME=\n")
    proc = _create(run_script, path)
    assert proc.returncode == 0, proc.stderr
    assert dry_lines(proc)[1] == (
        "gcloud compute tpus tpu-vm create qt-v5e-8 --project=qt-proj --zone=us-west4-a "
        "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite")


def test_example_settings_are_valid_and_list_every_key(run_script):
    example = SCRIPTS / "settings.example.env"
    proc = _create(run_script, example)
    assert proc.returncode == 0, proc.stderr
    keys = {line.split("=", 1)[0] for line in example.read_text().splitlines()
            if line and not line.startswith((" ", "#"))}
    common = (SCRIPTS / "common.sh").read_text()
    declared = set(common.split("QT_REQUIRED_KEYS=(", 1)[1].split(")", 1)[0].split())
    declared |= {line.split("]", 1)[0].strip(" [") for line in
                 common.split("declare -A QT_DEFAULTS=(", 1)[1].split("\n)", 1)[0].splitlines()
                 if line.strip().startswith("[")}
    assert keys == declared


@pytest.mark.parametrize("script", ["create", "run", "stop", "watch", "logs"])
def test_unknown_flags_are_errors(script, run_script, settings_file):
    proc = run_script(script, "--settings", str(settings_file(V5E_8)), "--dry-run", "--bogus")
    assert proc.returncode == 1
    assert "'--bogus'" in proc.stderr


def test_run_needs_an_existing_config(run_script, settings_file):
    path = settings_file(V5E_8)
    proc = run_script("run", "--settings", str(path), "--dry-run")
    assert proc.returncode == 1 and "missing --config FILE" in proc.stderr
    proc = run_script("run", "--settings", str(path), "--dry-run", "--config", "configs/no.yaml")
    assert proc.returncode == 1 and "--config configs/no.yaml: no such file" in proc.stderr


def test_relaunch_checks_the_config_before_deleting(run_script, settings_file, fake_gcloud):
    proc = run_script("relaunch", "--settings", str(settings_file(V5E_8)), "--config", "no.yaml")
    assert proc.returncode == 1 and "no such file" in proc.stderr
    assert fake_gcloud.calls() == []


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: `apt-get update && apt-get install -y "
                    "shellcheck` (Debian/Ubuntu) or `brew install shellcheck` (macOS)")
    scripts = sorted(str(p) for p in [*SCRIPTS.glob("*.sh"), *SCRIPTS.glob("remote/*.sh")])
    assert len(scripts) >= 17
    proc = subprocess.run([shellcheck, "--external-sources", *scripts], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_executable_and_strict():
    for path in [*SCRIPTS.glob("*.sh"), *SCRIPTS.glob("remote/*.sh")]:
        text = path.read_text()
        if path.name == "common.sh":
            assert text.startswith("# shellcheck shell=bash\n")
            continue
        assert path.stat().st_mode & 0o111, f"{path} is not executable"
        assert text.startswith("#!/usr/bin/env bash\n"), path
        assert "\nset -euo pipefail\n" in text, path
        assert "\n# Example Usage: " in text, path
