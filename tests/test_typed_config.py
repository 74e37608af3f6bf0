"""The typed config tree: round trip, overrides, base files and every rejection."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mmdit.typed_config import (
    ConfigError,
    add_config_arguments,
    apply_overrides,
    config_from_args,
    dumps_yaml,
    from_dict,
    load,
    save,
    to_dict,
)
from training.config import RunConfig
from training.stages import has_stages, load_stages

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Inner:
    depth: int = 2
    ratio: float = 4.0
    norm: Literal["none", "rms_norm"] = "none"
    layers: tuple[int, ...] = ()
    width: int | None = None

    def __post_init__(self):
        if self.depth < 1:
            raise ValueError(f"depth={self.depth} must be >= 1")


@dataclass(frozen=True)
class Outer:
    name: str = "run"
    lr: float = 1e-4
    flag: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- round trip ---------------------------------------------------------------------------


def test_defaults_round_trip_through_yaml_and_json(tmp_path):
    cfg = Outer(name="x", lr=3e-4, tags=["a"], inner=Inner(depth=3, layers=(0, 1), width=64))
    for suffix in (".yaml", ".json"):
        path = save(cfg, tmp_path / f"resolved{suffix}")
        assert load(Outer, path) == cfg
    assert json.loads((tmp_path / "resolved.json").read_text())["inner"]["layers"] == [0, 1]


def test_every_shipped_run_file_loads_and_round_trips(tmp_path):
    # configs/scaling/ladder_*.yaml are ladders (slurm.ladder, tested there), not run files.
    files = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "ladder" not in p.name)
    assert files, "configs/ holds no YAML run files"
    for path in files:
        # A chain of stages (training.stages) is one run config per stage.
        configs = (
            [s.config for s in load_stages(path)] if has_stages(path) else [load(RunConfig, path)]
        )
        for cfg in configs:
            assert load(RunConfig, save(cfg, tmp_path / "r.yaml")) == cfg, path
            assert load(RunConfig, save(cfg, tmp_path / "r.json")) == cfg, path


def test_run_file_overrides_only_what_differs():
    cfg = load(RunConfig, REPO / "configs" / "d24_512px.yaml")
    defaults = RunConfig()
    assert cfg.model.depth == 24 and cfg.model.hidden_size == 64 * 24
    assert cfg.data.resolution == 512
    assert cfg.train.betas == defaults.train.betas  # untouched keys keep the schema default


def test_resolved_config_contains_every_field():
    text = dumps_yaml(RunConfig())
    for section in ("model", "conditioning", "data", "train", "eval", "launch"):
        assert f"{section}:" in text
    assert set(to_dict(RunConfig())["train"]) == {
        f.name for f in dataclasses.fields(RunConfig().train)
    }


# --- overrides ----------------------------------------------------------------------------


def test_dotted_overrides_apply_after_the_file(tmp_path):
    path = write(tmp_path, "a.yaml", "lr: 0.1\ninner:\n  depth: 5\n")
    cfg = load(
        Outer,
        path,
        [
            "inner.depth=7",
            "lr=3e-4",
            "inner.layers=[1, 2]",
            "inner.width=null",
            "name=0123",
            "flag=true",
        ],
    )
    assert cfg.inner.depth == 7
    assert cfg.lr == pytest.approx(3e-4) and isinstance(cfg.lr, float)
    assert cfg.inner.layers == (1, 2)
    assert cfg.inner.width is None
    assert cfg.name == "0123"  # a string field keeps the text verbatim
    assert cfg.flag is True


def test_yaml_scientific_notation_is_a_float(tmp_path):
    # Plain PyYAML reads `1e-4` as the string "1e-4"; ours reads a number.
    cfg = load(Outer, write(tmp_path, "a.yaml", "lr: 1e-4\n"))
    assert cfg.lr == pytest.approx(1e-4)


def test_base_file_chain_merges_sections(tmp_path):
    write(tmp_path, "base.yaml", "name: base\ninner:\n  depth: 3\n  ratio: 2.0\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\ninner:\n  depth: 9\n")
    cfg = load(Outer, child)
    assert (cfg.name, cfg.inner.depth, cfg.inner.ratio) == ("base", 9, 2.0)


def test_cli_helpers_parse_config_and_overrides(tmp_path):
    path = write(tmp_path, "a.yaml", "inner:\n  depth: 4\n")
    parser = argparse.ArgumentParser(prog="mmdit-x")
    add_config_arguments(parser)
    args = parser.parse_args(["--config", str(path), "inner.ratio=2.5"])
    cfg = config_from_args(Outer, args, parser)
    assert (cfg.inner.depth, cfg.inner.ratio) == (4, 2.5)


# --- rejections: one line that names the key, the file and the fix --------------------------


def _error(tmp_path, text: str, overrides=()) -> str:
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load(Outer, path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    msg = _error(tmp_path, "inner:\n  dpeth: 3\n")
    assert "unknown key 'inner.dpeth'" in msg
    assert "bad.yaml" in msg
    assert "did you mean 'depth'" in msg


def test_unknown_section_is_rejected(tmp_path):
    msg = _error(tmp_path, "innr:\n  depth: 3\n")
    assert "unknown key 'innr'" in msg and "did you mean 'inner'" in msg


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("inner:\n  depth: 2.5\n", "inner.depth", "an integer"),
        ("inner:\n  depth: true\n", "inner.depth", "an integer"),
        ("flag: 1\n", "flag", "true or false"),
        ("lr: fast\n", "lr", "a number"),
        ("name: 3\n", "name", "a string"),
        ("inner:\n  norm: layer\n", "inner.norm", "one of 'none', 'rms_norm'"),
        ("betas: [0.9]\n", "betas", "a list of 2 items"),
        ("inner:\n  layers: [0, x]\n", "inner.layers[1]", "an integer"),
        ("inner: 3\n", "inner", "must be a mapping"),
    ],
)
def test_wrong_types_name_the_key_and_expected_type(tmp_path, text, key, expected):
    msg = _error(tmp_path, text)
    assert f"'{key}'" in msg and expected in msg and "bad.yaml" in msg


def test_invalid_value_from_post_init_names_file_and_section(tmp_path):
    msg = _error(tmp_path, "inner:\n  depth: 0\n")
    assert "bad.yaml" in msg and "'inner'" in msg and "depth=0 must be >= 1" in msg


def test_missing_file_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(Outer, tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value) and "--config configs/" in str(info.value)


def test_missing_base_file_is_reported(tmp_path):
    path = write(tmp_path, "child.yaml", "base: gone.yaml\n")
    with pytest.raises(ConfigError, match="gone.yaml"):
        load(Outer, path)


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    b = write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load(Outer, b)


def test_duplicate_keys_are_rejected(tmp_path):
    msg = _error(tmp_path, "lr: 0.1\nlr: 0.2\n")
    assert "duplicate key 'lr'" in msg and "line 2" in msg


def test_invalid_yaml_is_one_line(tmp_path):
    msg = _error(tmp_path, "inner: [1, 2\n")
    assert "not valid YAML" in msg


def test_top_level_must_be_a_mapping(tmp_path):
    assert "must be a mapping" in _error(tmp_path, "- 1\n- 2\n")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("inner.dpeth=3", "unknown key 'inner.dpeth'"),
        ("depth=3", "unknown key 'depth'"),
        ("inner.depth", "not of the form section.key=value"),
        ("inner..depth=1", "not of the form"),
        ("lr.x=1", "'lr' is a value, not a section"),
        ("inner.depth=three", "'inner.depth' must be an integer"),
    ],
)
def test_bad_overrides_are_rejected(tmp_path, override, expected):
    assert expected in _error(tmp_path, "{}\n", [override])


def test_cli_exits_with_one_line_on_config_error(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mmdit-x")
    add_config_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit) as info:
        config_from_args(Outer, args, parser)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmdit-x: error: config file") and "\n" not in err


def test_from_dict_rejects_unknown_keys_without_a_file():
    with pytest.raises(ConfigError, match="<dict>: unknown key 'nope'"):
        from_dict(Outer, {"nope": 1})


def test_apply_overrides_does_not_mutate_its_input():
    data = {"inner": {"depth": 3}}
    out = apply_overrides(Outer, data, ["inner.depth=4"])
    assert data == {"inner": {"depth": 3}} and out["inner"]["depth"] == 4
