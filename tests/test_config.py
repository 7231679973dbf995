import pytest
from omegaconf import OmegaConf

from fedprog.config import JSON_PREFIX, from_run_config, load_config, to_run_config


@pytest.mark.parametrize(
    "name", ["synth", "data_check", "train", "simulate", "certs", "site", "server", "audit"]
)
def test_every_command_config_composes(name):
    load_config(name)


def test_overrides_and_groups_compose():
    cfg = load_config("simulate", ["strategy=fedprox", "rounds=3", "heldout=[c2]", "modules=sdir_cade"])
    assert cfg.rounds == 3
    assert list(cfg.heldout) == ["c2"]
    assert cfg.model.sdir.enabled and cfg.model.cade.enabled
    assert cfg.federation.partition  # sites/federation/<name>.yaml is on the search path


def test_run_config_round_trip_is_exact():
    cfg = load_config("simulate", ["heldout=[c3]"])
    flat = to_run_config(cfg)
    assert all(isinstance(value, bool | int | float | str) for value in flat.values())
    assert flat["heldout"] == JSON_PREFIX + '["c3"]'
    restored = from_run_config(flat)
    assert OmegaConf.to_container(restored) == OmegaConf.to_container(cfg, resolve=True)


def test_strings_that_look_encoded_survive_the_round_trip():
    tree = {"a": {"b": "json:[1]", "c": None, "d": [1, {"e": 2}], "f": 1.5, "g": True}}
    assert OmegaConf.to_container(from_run_config(to_run_config(tree))) == tree
