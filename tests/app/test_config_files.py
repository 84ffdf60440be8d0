"""The config loader's files: finding them (as given, then under the project root) and reading them."""

from dataclasses import dataclass
from pathlib import Path

import pytest

import app.config
from app.config import find_config_file, load_config
from tests.app.test_config import Root, error_of, write

REPO = Path(__file__).resolve().parents[2]  # holds the shipped configs/


@dataclass
class Small:
    """A schema none of the shipped configs fits: loading one of them by mistake fails."""

    seed: int = 0
    name: str = "default"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working directory outside the repository, as a new user's would be."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd.resolve()


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    """A stand-in project root whose configs/ holds small.yaml (seed: 2)."""
    root = (tmp_path / "project").resolve()
    (root / "configs").mkdir(parents=True)
    write(root / "configs", "seed: 2\n", "small.yaml")
    monkeypatch.setattr(app.config, "_PROJECT_ROOT", root)
    return root


# ---------------------------------------------------------------------------------- finding files


def test_shipped_config_is_found_from_any_directory(elsewhere):
    assert not (elsewhere / "configs").exists()
    assert find_config_file("configs/quickstart.yaml") == REPO / "configs" / "quickstart.yaml"


def test_config_in_the_project_root_is_read_as_if_given_by_absolute_path(elsewhere, fake_root):
    assert load_config(Small, "configs/small.yaml") == Small(seed=2)
    bad = write(fake_root / "configs", "seed: many\n", "bad.yaml")
    message = error_of(Small, "configs/bad.yaml")
    assert message == error_of(Small, bad)
    assert message == f"{bad}:1: wrong type for 'seed': expected int, got 'many'"


def test_file_in_the_working_directory_wins_over_the_shipped_one(elsewhere, fake_root):
    (elsewhere / "configs").mkdir()
    write(elsewhere / "configs", "seed: 1\nname: mine\n", "small.yaml")
    assert load_config(Small, "configs/small.yaml") == Small(seed=1, name="mine")


def test_local_quickstart_wins_over_the_real_shipped_one(elsewhere):
    # The shipped quickstart.yaml has keys Small lacks: only reading the local file gives a config.
    (elsewhere / "configs").mkdir()
    write(elsewhere / "configs", "seed: 5\n", "quickstart.yaml")
    assert find_config_file("configs/quickstart.yaml") == Path("configs/quickstart.yaml")
    assert load_config(Small, "configs/quickstart.yaml") == Small(seed=5)


def test_missing_relative_file_names_both_places_looked(elsewhere):
    assert error_of(Small, "configs/nope.yaml") == (
        "config file not found: 'configs/nope.yaml' "
        f"(looked for {elsewhere}/configs/nope.yaml and {REPO}/configs/nope.yaml)"
    )


def test_missing_file_is_named(elsewhere, tmp_path):
    path = tmp_path / "configs" / "nope.yaml"
    assert error_of(Root, path) == f"config file not found: '{path}'"


def test_without_shipped_configs_only_the_working_directory_is_searched(elsewhere, tmp_path, monkeypatch):
    site = tmp_path / "site-packages"  # where a wheel installs app/: no configs/ beside it
    site.mkdir()
    write(site, "seed: 3\n", "small.yaml")
    monkeypatch.setattr(app.config, "_PROJECT_ROOT", site)
    expected = f"config file not found: 'small.yaml' (looked for {elsewhere}/small.yaml)"
    assert error_of(Small, "small.yaml") == expected


def test_working_directory_that_is_the_project_root_is_looked_in_once(monkeypatch):
    monkeypatch.chdir(REPO)
    assert error_of(Small, "configs/nope.yaml") == (
        f"config file not found: 'configs/nope.yaml' (looked for {REPO}/configs/nope.yaml)"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["fit", "--config", "configs/quickstart.yaml"], "  path: data/pointmaze-large-quickstart.zarr"),
        # --config defaults to configs/tmrl_pointmaze.yaml
        (["finetune", "--from-run", "unused"], "method: tmrl"),
    ],
)
def test_cli_reads_shipped_configs_from_any_directory(elsewhere, capsys, argv, expected):
    from app.cli import main

    code = main([*argv, "--print-config"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert expected in out.splitlines()


# ---------------------------------------------------------------------------------- reading files


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "seed: 1\ntrainer:\n  max_steps: 5\n bad: [1, 2\n")
    message = error_of(Root, path)
    assert message.startswith(f"{path}:4:") and "invalid YAML" in message


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- seed\n- 1\n")
    assert error_of(Root, path) == (
        f"{path}: the top level must be a mapping of settings (key: value lines), got ['seed', '1']"
    )


def test_duplicate_key_is_refused(tmp_path):
    path = write(tmp_path, "seed: 1\ntask: a\nseed: 2\n")
    assert error_of(Root, path) == f"{path}:3: duplicate key 'seed' (first set at {path}:1)"
