"""The shipped configs load, and the example documents every field of the config tree."""

from __future__ import annotations

from pathlib import Path

import yaml

from gpte_ray.config import JobConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_example_documents_every_field():
    raw = yaml.safe_load((ROOT / "configs/example.yaml").read_text())
    for section, field in JobConfig.model_fields.items():
        assert set(raw[section]) == set(field.annotation.model_fields), section
    load_config(ROOT / "configs/example.yaml")


def test_nightly_config_loads():
    cfg = load_config(ROOT / "configs/nightly.yaml")
    assert cfg.output.max_delete_fraction == 0.1 and cfg.input.template


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert ci in (ROOT / "README.md").read_text()
