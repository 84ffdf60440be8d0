"""The config loader's error messages: unknown keys, wrong types, required values, refused settings."""

from dataclasses import dataclass, field

import pytest

from app.config import ConfigError, load_config
from tests.app.test_config import REQUIRED, Encoder, Root, error_of, write

# ----------------------------------------------------------------------------------- unknown keys


def test_unknown_nested_yaml_key_names_file_line_key_and_suggestion(tmp_path):
    path = write(tmp_path, "seed: 1\ntask: a\ntrainer:\n  max_stesp: 5\n")
    assert error_of(Root, path) == (
        f"{path}:4: unknown key 'trainer.max_stesp'; did you mean 'trainer.max_steps'? "
        "(valid keys under 'trainer': max_steps, optim, run_name)"
    )


def test_unknown_override_key_is_named_as_the_override():
    message = error_of(Root, None, [*REQUIRED, "trainer.max_stesp=5"])
    assert message == (
        "command-line override 'trainer.max_stesp=5': unknown key 'trainer.max_stesp'; "
        "did you mean 'trainer.max_steps'? (valid keys under 'trainer': max_steps, optim, run_name)"
    )


def test_unknown_key_at_the_wrong_level_suggests_its_full_path():
    message = error_of(Root, None, [*REQUIRED, "max_steps=5"])
    assert "unknown key 'max_steps'; did you mean 'trainer.max_steps'?" in message
    assert "(valid top-level keys: seed, task, trainer, encoder, use_ema, milestones, tags, limit)" in message


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    path = write(tmp_path, "seed: 1\ntask: a\nencoder: {zzz: 1}\n")
    expected = f"{path}:3: unknown key 'encoder.zzz' (valid keys under 'encoder': width, kind)"
    assert error_of(Root, path) == expected


def test_key_below_a_single_value_is_unknown():
    message = error_of(Root, None, [*REQUIRED, "seed.x=1"])
    assert message == (
        "command-line override 'seed.x=1': unknown key 'seed.x': 'seed' is a single value (int), "
        "not a section with keys"
    )


# ------------------------------------------------------------------------------------ wrong types


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_steps=abc", "wrong type for 'trainer.max_steps': expected int, got 'abc'"),
        ("trainer.max_steps=2.5", "wrong type for 'trainer.max_steps': expected int, got '2.5'"),
        ("trainer.max_steps=true", "wrong type for 'trainer.max_steps': expected int, got 'true'"),
        ("use_ema=1", "wrong type for 'use_ema': expected bool, got '1'"),
        ("limit=fast", "wrong type for 'limit': expected float | None, got 'fast'"),
        ("trainer.max_steps=null", "wrong type for 'trainer.max_steps': expected int, got null"),
        (
            "trainer.optim.betas=abc",
            "wrong type for 'trainer.optim.betas': expected list[float], got 'abc' "
            "(a list is written [a, b, c])",
        ),
        (
            "trainer.optim.betas=[0.9, x]",
            "wrong type for 'trainer.optim.betas': expected list[float], got ['0.9', 'x']: "
            "item 1: expected float, got 'x'",
        ),
        (
            "trainer=5",
            "wrong type for 'trainer': expected a mapping of Trainer settings "
            "(keys: max_steps, optim, run_name), got '5'",
        ),
        ("milestones=[1, 2", "value '[1, 2' is not valid YAML"),
    ],
)
def test_wrong_override_type_names_source_key_type_and_value(override, expected):
    message = error_of(Root, None, [*REQUIRED, override])
    assert message.startswith(f"command-line override {override!r}: ")
    assert expected in message


def test_mapping_where_a_scalar_is_expected_in_yaml(tmp_path):
    path = write(tmp_path, "seed: 1\ntask: a\ntrainer:\n  max_steps:\n    a: 1\n")
    assert error_of(Root, path) == (
        f"{path}:5: wrong type for 'trainer.max_steps': expected int, got {{'a': '1'}}"
    )


def test_quoted_string_for_a_list_in_yaml(tmp_path):
    path = write(tmp_path, "seed: 1\ntask: a\ntrainer: {optim: {betas: '0.9, 0.99'}}\n")
    message = error_of(Root, path)
    assert message.startswith(f"{path}:3: wrong type for 'trainer.optim.betas': expected list[float]")
    assert "got '0.9, 0.99'" in message


# ------------------------------------------------------------------------------- required values


def test_all_missing_required_values_are_listed_at_once():
    message = error_of(Root)
    assert message == (
        "2 problems in the configuration:\n"
        "  - required value 'seed' (int) is not set: set it in a YAML config file "
        "or on the command line as 'seed=...'\n"
        "  - required value 'task' (str) is not set: set it in a YAML config file "
        "or on the command line as 'task=...'"
    )


def test_missing_value_names_the_yaml_file_and_plain_question_marks_unset(tmp_path):
    path = write(tmp_path, "seed: ???\ntask: a\n")
    assert error_of(Root, path) == (
        f"required value 'seed' (int) is not set: set it in {path} or on the command line as 'seed=...'"
    )
    assert load_config(Root, path, ["seed=4"]).seed == 4


def test_plain_question_marks_unset_an_earlier_value(tmp_path):
    path = write(tmp_path, "seed: 1\ntask: a\ntrainer:\n  max_steps: ???\n")
    assert error_of(Root, path).startswith("required value 'trainer.max_steps' (int) is not set")
    assert load_config(Root, path, ["trainer.max_steps=5"]).trainer.max_steps == 5


def test_quoted_question_marks_are_a_plain_string(tmp_path):
    cfg = load_config(Root, write(tmp_path, "seed: 1\ntask: '???'\ntags: ['???', '\\???']\n"))
    assert cfg.task == "???" and type(cfg.task) is str
    assert cfg.tags == ["???", "\\???"] and all(type(t) is str for t in cfg.tags)


@dataclass
class NeedsSection:
    encoder: Encoder  # no default: required like any other field


def test_section_without_default_is_required_until_a_key_is_set():
    assert error_of(NeedsSection) == (
        "required value 'encoder' (Encoder) is not set: set it in a YAML config file "
        "or on the command line as 'encoder=...' or 'encoder.<key>=...'"
    )
    assert load_config(NeedsSection, None, ["encoder.width=3"]).encoder == Encoder(width=3)


def test_problems_from_file_overrides_and_missing_values_come_together(tmp_path):
    path = write(tmp_path, "task: a\nuse_ema: maybe\n")
    with pytest.raises(ConfigError) as info:
        load_config(Root, path, ["trainer.max_stesp=1", "oops"])
    problems = info.value.problems
    assert len(problems) == 4
    assert problems[0].startswith(f"{path}:2: wrong type for 'use_ema'")
    assert problems[1].startswith("command-line override 'trainer.max_stesp=1': unknown key")
    assert problems[2] == "command-line override 'oops': expected the form key=value, e.g. 'seed=...'"
    assert problems[3].startswith("required value 'seed' (int) is not set")
    assert str(info.value).startswith("4 problems in the configuration:\n  - ")


def test_override_without_equals_shows_the_form():
    message = error_of(Root, None, [*REQUIRED, "trainer.max_steps"])
    assert message == (
        "command-line override 'trainer.max_steps': expected the form key=value, e.g. 'trainer.max_steps=...'"
    )


# ------------------------------------------------------------------------------ schema validation


def test_post_init_error_keeps_message_and_adds_source(tmp_path):
    message = error_of(Root, None, [*REQUIRED, "trainer.optim.lr=-1"])
    assert message == (
        "invalid settings in 'trainer.optim' (set from command-line override 'trainer.optim.lr=-1'): "
        "lr must be > 0, got -1.0"
    )
    path = write(tmp_path, "seed: 1\ntask: a\ntrainer: {optim: {lr: 0}}\n")
    with pytest.raises(ValueError) as info:  # ConfigError is a ValueError, so callers may catch either
        load_config(Root, path)
    assert str(info.value).startswith(f"invalid settings in 'trainer.optim' (set from {path}): lr must")


@dataclass
class CrossChecked:
    min_width: int = 0
    encoder: Encoder = field(default_factory=Encoder)

    def __post_init__(self) -> None:
        if self.encoder.width < self.min_width:
            raise ValueError("encoder.width must be >= min_width")


def test_root_post_init_error_names_every_source_below_it(tmp_path):
    path = write(tmp_path, "encoder:\n  width: 4\n  kind: mlp\n")
    assert error_of(CrossChecked, path, ["min_width=8"]) == (
        f"invalid settings in the configuration (set from command-line override 'min_width=8', {path}): "
        "encoder.width must be >= min_width"
    )


def test_schema_bugs_are_type_errors():
    @dataclass
    class Bad:
        table: dict[str, int] = field(default_factory=dict)

    with pytest.raises(TypeError, match="field 'table' has unsupported type"):
        load_config(Bad)

    @dataclass
    class Derived:
        width: int = 2
        area: int = field(init=False, default=0)

    with pytest.raises(TypeError, match=r"declares \['area'\] with init=False"):
        load_config(Derived)
    with pytest.raises(TypeError, match="needs a dataclass type"):
        load_config(Root(seed=1, task="a"))
    with pytest.raises(TypeError, match="sequence of 'key=value' strings"):
        load_config(Root, None, "seed=1")
