"""Presets: loading, --set overrides, validation with one-line errors, the rank budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rankopt.config import (Config, ControllerConfig, build_config, load_config, parse_overrides, preset_names,
                            set_dotted)
from rankopt.errors import RankoptError


def assert_one_line_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert message and "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message


# --- shipped presets --------------------------------------------------------------------------


def test_presets_are_shipped():
    assert {"demo", "sst2"} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_loads(name, tmp_path):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert cfg.controller.min_rank <= cfg.adapter.init_rank <= cfg.controller.max_rank
    initial, target = cfg.budget(36)
    assert initial == 36 * cfg.adapter.init_rank and target >= 36 * cfg.controller.min_rank
    # its search space names real config keys, and its --data form points at a local folder
    for key in cfg.search.space:
        build_config(cfg.model_dump(), {key: _value_in(cfg.search.space[key])})
    local = load_config(name, data_dir=str(tmp_path))
    assert local.task.data_dir == str(tmp_path.resolve())
    assert local.task.dataset is None and local.task.builtin is None


def _value_in(dist):
    if dist.type == "categorical":
        return dist.choices[0]
    return int(dist.low) if dist.type == "int" else dist.low


# --- overrides ------------------------------------------------------------------------------


def test_overrides_are_parsed_as_yaml_values():
    parsed = parse_overrides(["training.lr=1e-3", "training.steps=12", "controller.enabled=false",
                              "task.text_columns=[a, b]", "model.name=some/model", "task.num_labels=",
                              "training.device = cpu", 'task.name="3e5"'])
    assert parsed == {"training.lr": 0.001, "training.steps": 12, "controller.enabled": False,
                      "task.text_columns": ["a", "b"], "model.name": "some/model", "task.num_labels": None,
                      "training.device": "cpu", "task.name": "3e5"}


@pytest.mark.parametrize("pair", ["training.lr", "=3", ""])
def test_an_override_without_key_and_value_is_rejected(pair):
    with pytest.raises(RankoptError) as excinfo:
        parse_overrides([pair])
    assert_one_line_error(excinfo, "KEY=VALUE")


def test_overrides_reach_the_config_and_leave_the_preset_alone():
    cfg = load_config("demo", ["training.lr=1e-3", "training.steps=7", "controller.importance=energy"])
    assert (cfg.training.lr, cfg.training.steps, cfg.controller.importance) == (0.001, 7, "energy")
    assert load_config("demo").training.steps != 7
    raw = load_config("demo").model_dump()
    build_config(raw, {"training.steps": 3})
    assert raw["training"]["steps"] != 3  # build_config works on a copy


def test_set_dotted_creates_missing_sections_but_not_through_values():
    tree = {"training": {"lr": 1.0}}
    set_dotted(tree, "search.space.training.lr", {"type": "float"})
    assert tree["search"]["space"]["training"]["lr"] == {"type": "float"}
    with pytest.raises(RankoptError) as excinfo:
        set_dotted(tree, "training.lr.deeper", 1)
    assert_one_line_error(excinfo, "training.lr.deeper")


# --- errors ----------------------------------------------------------------------------------


def test_unknown_preset():
    with pytest.raises(RankoptError) as excinfo:
        load_config("no_such_preset")
    assert_one_line_error(excinfo, "unknown preset 'no_such_preset'", "demo")


def test_missing_preset_file(tmp_path):
    with pytest.raises(RankoptError) as excinfo:
        load_config(str(tmp_path / "nope.yml"))
    assert_one_line_error(excinfo, "does not exist")


@pytest.mark.parametrize("text,fragment", [("task: [unclosed\n", "not valid YAML at line"),
                                           ("- a\n- b\n", "must be a mapping")])
def test_broken_preset_file(tmp_path, text, fragment):
    path = tmp_path / "broken.yml"
    path.write_text(text)
    with pytest.raises(RankoptError) as excinfo:
        load_config(str(path))
    assert_one_line_error(excinfo, fragment)


@pytest.mark.parametrize("key,mistake", [
    ("steps:", lambda line: line.replace("steps:", "steps")),  # a key without its colon
    ("batch_size:", lambda line: line.replace("batch_size:", "- batch_size:")),  # a stray list dash
    ("lr:", lambda line: line.replace("lr: ", 'lr: "')),  # an unclosed quote
    ("text_columns:", lambda line: line.replace("[text]", "[text")),  # an unclosed bracket
    ("min_rank:", lambda line: "\t" + line.lstrip()),  # a tab
])
def test_a_yaml_mistake_is_named_on_its_own_line(tmp_path, key, mistake):
    """PyYAML notices most of these on the next line; the error names the line that is wrong."""
    lines = (Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yml").read_text().splitlines()
    wrong = next(i for i, line in enumerate(lines) if line.strip().startswith(key))
    lines[wrong] = mistake(lines[wrong])
    path = tmp_path / "broken.yml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RankoptError) as excinfo:
        load_config(str(path))
    assert_one_line_error(excinfo, f"not valid YAML at line {wrong + 1} ({lines[wrong].strip()[:80]})")


@pytest.mark.parametrize("key", ["training.lrr", "trainer.lr", "controller.target_rank.x"])
def test_unknown_key(key):
    with pytest.raises(RankoptError) as excinfo:
        load_config("demo", [f"{key}=1"])
    assert_one_line_error(excinfo, "unknown config key")


@pytest.mark.parametrize("pair,field", [
    ("training.steps=abc", "training.steps"),
    ("training.lr=fast", "training.lr"),
    ("controller.importance=random", "controller.importance"),
    ("task.text_columns=5", "task.text_columns"),
    ("training.steps=0", "training.steps"),
    ("adapter.dropout=1.5", "adapter.dropout"),
])
def test_wrong_type_or_value(pair, field):
    with pytest.raises(RankoptError) as excinfo:
        load_config("demo", [pair])
    assert_one_line_error(excinfo, field, "preset 'demo'")


@pytest.mark.parametrize("pairs,fragment", [
    (["controller.min_rank=1", "controller.target_rank=0.5"], "target_rank=0.5"),
    (["controller.target_rank=33"], "target_rank=33"),
    (["controller.min_rank=4", "controller.target_rank=3"], "target_rank=3"),
    (["adapter.init_rank=40"], "init_rank=40"),
    (["controller.min_rank=9", "controller.max_rank=8"], "min_rank"),
    (["controller.warmup=0.6", "controller.final=0.5"], "warmup + controller.final"),
])
def test_rank_bounds_are_checked(pairs, fragment):
    with pytest.raises(RankoptError) as excinfo:
        load_config("demo", pairs)
    assert_one_line_error(excinfo, fragment)


def test_a_budget_below_one_rank_per_layer_is_a_choice_of_where_adapters_go_at_min_rank_zero():
    cfg = load_config("demo", ["controller.target_rank=0.5"])
    assert cfg.controller.min_rank == 0 and cfg.controller.target_rank == 0.5


@pytest.mark.parametrize("pairs,fragment", [
    (["task.dataset=glue"], "exactly one of"),
    (["task.builtin=null"], "exactly one of"),
    (["task.type=regression"], "regression tasks use metric"),
])
def test_task_consistency(pairs, fragment):
    with pytest.raises(RankoptError) as excinfo:
        load_config("demo", pairs)
    assert_one_line_error(excinfo, fragment)


def test_missing_required_key():
    raw = load_config("demo").model_dump()
    del raw["model"]["name"]
    with pytest.raises(RankoptError) as excinfo:
        build_config(raw)
    assert_one_line_error(excinfo, "missing config key 'model.name'")


def test_data_folder_must_exist(tmp_path):
    with pytest.raises(RankoptError) as excinfo:
        load_config("sst2", data_dir=str(tmp_path / "missing"))
    assert_one_line_error(excinfo, "--data", "not a folder")


# --- the budget -------------------------------------------------------------------------------


def test_budget_follows_layers_and_ranks(tiny_config):
    assert tiny_config.budget(12) == (4 * 12, 2 * 12)
    half = build_config(tiny_config.model_dump(), {"controller.target_rank": 2.5})
    assert half.budget(3) == (12, round(7.5))
    off = build_config(tiny_config.model_dump(), {"controller.enabled": False})
    assert off.budget(12) == (48, 48)


def test_budget_below_layers_times_min_rank_is_an_error(tiny_config):
    # target_rank < min_rank is refused when validated; a config assembled without validation
    # (model_construct) must still not yield an unreachable budget
    controller = ControllerConfig.model_construct(**{**tiny_config.controller.model_dump(), "target_rank": 0.4})
    cfg = Config.model_construct(**{**dict(tiny_config), "controller": controller})
    with pytest.raises(RankoptError) as excinfo:
        cfg.budget(12)
    assert_one_line_error(excinfo, "rank budget 5", "12 layers x min_rank 1")


def test_config_round_trips_through_yaml(tiny_config, tmp_path):
    path = tmp_path / "copy.yml"
    path.write_text(yaml.safe_dump(tiny_config.model_dump()))
    assert load_config(str(path)) == tiny_config
