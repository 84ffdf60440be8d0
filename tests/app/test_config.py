"""The config loader: precedence, typing, references and the YAML round trip.

Errors are tested in test_config_errors.py, finding and reading files in test_config_files.py; both use
the schemas and helpers defined here.
"""

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app.config import MISSING_VALUE, ConfigError, flatten, load_config, to_dict, to_yaml
from tests.tiny import BASES, tiny_config


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Trainer:
    max_steps: int = 100
    # A default that differs from Optim's own: partial YAML must merge onto THIS, not onto Optim().
    optim: Optim = field(default_factory=lambda: Optim(lr=3e-4))
    run_name: str | None = None


@dataclass
class Encoder:
    width: int = 32
    kind: str = "mlp"


@dataclass
class Root:
    seed: int  # required: no default
    task: str = MISSING_VALUE  # required the omegaconf way
    trainer: Trainer = field(default_factory=Trainer)
    encoder: Encoder | None = None
    use_ema: bool = False
    milestones: list[int] = field(default_factory=lambda: [10, 20])
    tags: list[str] = field(default_factory=list)
    limit: float | None = None


@dataclass
class Quoted:
    """String annotations, as written under ``from __future__ import annotations``."""

    n: "int" = 1
    enc: "Encoder | None" = None


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


REQUIRED = ["seed=0", "task=reach"]


# ------------------------------------------------------------------------------ values and precedence


def test_overrides_beat_yaml_which_beats_defaults(tmp_path):
    path = write(tmp_path, "seed: 1\ntask: push\ntrainer:\n  max_steps: 50\n  run_name: from_yaml\n")
    cfg = load_config(Root, path, ["trainer.max_steps=7", "seed=2", "seed=3"])
    assert cfg.seed == 3  # the later of two overrides wins
    assert cfg.trainer.max_steps == 7
    assert cfg.trainer.run_name == "from_yaml"
    assert cfg.task == "push"
    assert cfg.use_ema is False and cfg.milestones == [10, 20]  # schema defaults


def test_values_are_typed(tmp_path):
    path = write(tmp_path, "seed: 1\ntask: reach\ntrainer:\n  optim:\n    lr: 1e-3\n")
    cfg = load_config(Root, path, ["use_ema=true", "trainer.optim.betas=[0,0.5,1]", "milestones=[1, 2]"])
    # PyYAML alone reads '1e-3' as a string; the loader converts by the field's type.
    assert cfg.trainer.optim.lr == 1e-3 and type(cfg.trainer.optim.lr) is float
    assert cfg.use_ema is True
    assert cfg.trainer.optim.betas == [0.0, 0.5, 1.0]
    assert all(type(b) is float for b in cfg.trainer.optim.betas)
    assert cfg.milestones == [1, 2] and all(type(m) is int for m in cfg.milestones)
    cfg = load_config(Root, None, ["seed=3", "task=x", "trainer.optim.lr=1e-2", "trainer.max_steps=1e6"])
    assert type(cfg.seed) is int and cfg.seed == 3
    assert cfg.trainer.optim.lr == 0.01
    assert cfg.trainer.max_steps == 1_000_000 and type(cfg.trainer.max_steps) is int


def test_str_fields_keep_the_text_as_written(tmp_path):
    path = write(tmp_path, "seed: 1\ntask: 3\ntrainer:\n  run_name: yes\ntags: [a, 1.10, on]\n")
    cfg = load_config(Root, path)
    assert cfg.task == "3" and cfg.trainer.run_name == "yes" and cfg.tags == ["a", "1.10", "on"]
    cfg = load_config(Root, path, ["task=007", "trainer.run_name=lr: 3", "tags=[x, 'y z']"])
    assert cfg.task == "007"
    assert cfg.trainer.run_name == "lr: 3"  # not YAML-parsed into a mapping for a str field
    assert cfg.tags == ["x", "y z"]


def test_optional_values_take_null(tmp_path):
    cfg = load_config(Root, write(tmp_path, "seed: 1\ntask: a\nlimit: 2\ntrainer: {run_name: ~}\n"))
    assert cfg.limit == 2.0 and cfg.trainer.run_name is None
    assert load_config(Root, None, [*REQUIRED, "limit=null"]).limit is None


def test_returns_real_dataclass_instances(tmp_path):
    cfg = load_config(Root, None, REQUIRED)
    assert type(cfg) is Root and type(cfg.trainer) is Trainer and type(cfg.trainer.optim) is Optim
    assert type(cfg.trainer.optim.betas) is list
    # Each load gets its own lists: mutating one config must not leak into the next.
    cfg.trainer.optim.betas.append(5.0)
    assert load_config(Root, None, REQUIRED).trainer.optim.betas == [0.9, 0.999]


def test_partial_section_merges_onto_the_fields_default(tmp_path):
    path = write(tmp_path, "seed: 1\ntask: a\ntrainer:\n  optim:\n    betas: [0.5, 0.6]\n")
    cfg = load_config(Root, path)
    assert cfg.trainer.optim.lr == 3e-4  # Trainer's default Optim, not Optim's class default 1e-3
    assert cfg.trainer.optim.betas == [0.5, 0.6]


def test_optional_section_is_created_by_setting_a_key(tmp_path):
    assert load_config(Root, None, REQUIRED).encoder is None
    cfg = load_config(Root, None, [*REQUIRED, "encoder.width=64"])
    assert cfg.encoder == Encoder(width=64, kind="mlp")
    path = write(tmp_path, "seed: 1\ntask: a\nencoder: {kind: pointnet}\n")
    assert load_config(Root, path).encoder == Encoder(width=32, kind="pointnet")
    assert load_config(Root, path, ["encoder=null"]).encoder is None


@dataclass(frozen=True)
class Grid:
    sizes: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class WithSharedDefault:
    grid: Grid = Grid()  # one instance on the class, shared unless the loader copies it


def test_class_level_default_instance_is_not_shared():
    first = load_config(WithSharedDefault)
    first.grid.sizes.append(3)
    assert load_config(WithSharedDefault).grid.sizes == [1, 2]
    assert WithSharedDefault.grid.sizes == [1, 2]


def test_string_annotations_are_resolved():
    cfg = load_config(Quoted, None, ["n=4", "enc.width=8"])
    assert cfg == Quoted(n=4, enc=Encoder(width=8))


def test_empty_yaml_file_means_defaults(tmp_path):
    path = write(tmp_path, "# nothing set here\n")
    assert load_config(Root, path, REQUIRED) == load_config(Root, None, REQUIRED)


# --------------------------------------------------------------------------------- ${...} references


def test_references_are_resolved_after_the_merge(tmp_path):
    text = "seed: 1\ntask: reach\ntrainer:\n  run_name: ${task}_s${seed}\nlimit: ${trainer.max_steps}\n"
    cfg = load_config(Root, write(tmp_path, text), ["seed=7", "milestones=[1, '${seed}']"])
    assert cfg.trainer.run_name == "reach_s7"  # the override of seed comes later but is seen
    assert cfg.limit == 100.0 and type(cfg.limit) is float  # the int converted to the field's type
    assert cfg.milestones == [1, 7] and type(cfg.milestones[1]) is int


def test_reference_in_an_override(tmp_path):
    cfg = load_config(Root, None, [*REQUIRED, "encoder.width=${trainer.max_steps}", "trainer.max_steps=64"])
    assert cfg.encoder == Encoder(width=64, kind="mlp")
    cfg = load_config(Root, None, [*REQUIRED, "tags=[x, '${task}']"])
    assert cfg.tags == ["x", "reach"]
    escaped = load_config(Root, None, [*REQUIRED, "trainer.run_name=\\${seed}"])
    assert escaped.trainer.run_name == "${seed}"  # \${ is a literal ${
    assert "\\${seed}" in to_yaml(escaped)  # and stays one when the config is read back
    assert load_config(Root, write(tmp_path, to_yaml(escaped))) == escaped


def test_reference_to_an_unknown_key_names_the_key_and_the_reference(tmp_path):
    path = write(tmp_path, "seed: 1\ntask: a\ntrainer:\n  run_name: run_${trainer.max_step}\n")
    assert error_of(Root, path) == (
        f"{path}:4: 'trainer.run_name' refers to unknown key 'trainer.max_step' in "
        "'run_${trainer.max_step}'; did you mean 'trainer.max_steps'?"
    )
    message = error_of(Root, None, [*REQUIRED, "limit=${nothing.here}"])
    assert message == (
        "command-line override 'limit=${nothing.here}': 'limit' refers to unknown key 'nothing.here' "
        "in '${nothing.here}'"
    )


def test_unresolvable_reference_is_a_config_error_naming_key_and_source(tmp_path):
    path = write(tmp_path, "seed: 1\ntask: a\ntrainer:\n  max_steps: ${task}\n")
    message = error_of(Root, path)
    assert message.startswith(f"{path}:4: invalid value for 'trainer.max_steps': ")
    assert "'${task}'" in message and "Integer" in message and "\n" not in message
    message = error_of(Root, None, [*REQUIRED, "trainer.run_name=${.nope}"])  # relative: left to OmegaConf
    assert message.startswith("command-line override 'trainer.run_name=${.nope}': invalid value for ")
    assert "'.nope' not found" in message
    message = error_of(Root, None, [*REQUIRED, "trainer.run_name=${seed"])
    assert message.startswith("command-line override 'trainer.run_name=${seed': invalid value for ")


def test_reference_to_an_unset_value_names_only_that_value():
    assert error_of(Root, None, ["seed=1", "trainer.run_name=${task}"]) == (
        "required value 'task' (str) is not set: set it in a YAML config file "
        "or on the command line as 'task=...'"
    )


# -------------------------------------------------------------------------------------- exporting


def test_yaml_round_trip_gives_an_equal_config(tmp_path):
    text = "seed: 5\ntask: '???'\ntrainer:\n  run_name: 'yes'\n  optim: {lr: 1e-7}\ntags: ['3', '', null2]\n"
    cfg = load_config(Root, write(tmp_path, text), ["encoder.kind=pointnet", "limit=.inf"])
    again = load_config(Root, write(tmp_path, to_yaml(cfg), "saved.yaml"))
    assert again == cfg
    assert math.isinf(again.limit) and again.tags == ["3", "", "null2"] and again.task == "???"


def test_to_yaml_writes_readable_yaml():
    cfg = load_config(Root, None, REQUIRED)
    assert to_yaml(cfg).splitlines()[:8] == [
        "seed: 0",
        "task: reach",
        "trainer:",
        "  max_steps: 100",
        "  optim:",
        "    lr: 0.0003",
        "    betas: [0.9, 0.999]",
        "  run_name: null",
    ]


def test_to_dict_and_flatten():
    cfg = load_config(Root, None, [*REQUIRED, "encoder.width=8", "tags=[a, b]"])
    plain = to_dict(cfg)
    assert plain["trainer"]["optim"] == {"lr": 3e-4, "betas": [0.9, 0.999]}
    assert type(plain["trainer"]) is dict
    assert flatten(cfg) == {
        "seed": 0,
        "task": "reach",
        "trainer.max_steps": 100,
        "trainer.optim.lr": 3e-4,
        "trainer.optim.betas": "[0.9, 0.999]",
        "trainer.run_name": None,
        "encoder.width": 8,
        "encoder.kind": "mlp",
        "use_ema": False,
        "milestones": "[10, 20]",
        "tags": "['a', 'b']",
        "limit": None,
    }


@pytest.mark.parametrize(
    "path",
    sorted(str(p) for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    + [tiny_config(name) for name in BASES],
)
def test_every_shipped_config_loads(path):
    """Each shipped config is valid for its command: fit configs with the schema their context mode picks,
    fine-tuning configs (tmrl*.yaml) with FinetuneConfig; the test-size ones as the tests derive them."""
    from app.finetune_config import FinetuneConfig
    from app.tasks.registry import fit_schema

    schema = FinetuneConfig if Path(path).name.startswith("tmrl") else fit_schema(path)
    cfg = load_config(schema, path, ["data.path=x.zarr"] if schema is not FinetuneConfig else [])
    assert isinstance(cfg, schema)
