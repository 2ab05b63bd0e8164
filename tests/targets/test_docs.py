"""docs/qtarget.md's preset table matches the code, and its example runs."""

import inspect
import pathlib
import re

import numpy as np

from qtarget_jax import targets

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "qtarget.md"


def _table_rows():
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\| `(\w+)` \| (\w+) \| (\w+) \|[^|]*\|[^|]*\| ([^|]*) \|", line)
        if match:
            name, gamma, residual, knobs = match.groups()
            rows[name] = (gamma, residual, {k.strip() for k in knobs.split(",")})
    return rows


def test_table_lists_every_preset_with_its_rules_and_knobs():
    rows = _table_rows()
    assert set(rows) == set(targets.PRESETS)
    for name, (gamma, residual, knobs) in rows.items():
        spec = targets.get_preset(name)
        assert (spec.gamma, spec.residual) == (gamma, residual), name
        assert knobs == set(inspect.signature(targets.PRESETS[name]).parameters), name


def test_doc_example_runs():
    block = re.search(r"## Computing a loss\n\n```python\n(.*?)```", DOC.read_text(), re.S)
    scope = {}
    exec(block.group(1), scope)  # noqa: S102 - our own documentation
    assert np.isfinite(scope["loss"]) and float(scope["metrics"]["tokens"]) == 16


def test_readme_five_line_example_runs():
    readme = DOC.parents[1] / "README.md"
    block = re.search(r"## A Target-SFT loss in five lines\n\n```python\n(.*?)```",
                      readme.read_text(), re.S)
    scope = {}
    exec(block.group(1), scope)  # noqa: S102 - our own documentation
    assert np.isfinite(scope["loss"]) and float(scope["metrics"]["tokens"]) == 64
    assert 0.0 < float(scope["metrics"]["gamma"]) < 1.0
