import re

import pytest
from omegaconf import OmegaConf

from fedprog.config import JSON_PREFIX, config_dir, from_run_config, load_config, sites_dir, to_run_config
from fedprog.schema import ConfigError


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


# ------------------------------------------------------------------------------------------ declared keys
# A config read in the code is `cfg.a.b`, `cfg.a.get("b")` or `cfg["a"]["b"]`, where `cfg` (or another name in
# CONFIG_NAMES) is a config or a sub-tree of one (e.g. the training group inside the engine), so a read passes
# when it is a path *inside* some declared config tree. Attributes of typed objects with those names are not
# config keys:
NOT_CONFIG_KEYS = {
    "cade.kwargs": "models.model: ModelConfig.cade is a dataclass; kwargs() is its method",
    "sdir.kwargs": "models.model: ModelConfig.sdir is a dataclass; kwargs() is its method",
    "to_config": "federated.privacy.settings: a PrivacySettings method",
    "to_flat": "federated.privacy.central/local: a settings object's method",
}
CONFIG_NAMES = r"\b(?:cfg|settings|data_cfg|sim|fed)"  # the names the code gives a config or a sub-tree
CONFIG_READ = re.compile(
    CONFIG_NAMES
    + r"((?:\.[A-Za-z_]\w*)+)(?:\(\s*[\"']([A-Za-z_]\w*)[\"'])?|"
    + CONFIG_NAMES
    + r"((?:\[[\"'][A-Za-z_]\w*[\"']\])+)"
)
CONTAINER_METHODS = {"get", "items", "keys", "values", "pop", "setdefault"}


def _declared_paths() -> set[str]:
    """Every dotted path inside every YAML config (group files under their group or ``@package``)."""
    paths: set[str] = set()

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key != "defaults":
                    path = f"{prefix}.{key}" if prefix else str(key)
                    paths.add(path)
                    walk(path, value)

    for root in (config_dir(), sites_dir()):
        for path in root.rglob("*.yaml"):
            first = path.read_text().splitlines()[:1]
            package = re.match(r"#\s*@package\s+(\w+)", first[0]) if first else None
            group = path.parent.name if path.parent not in (config_dir(), sites_dir() / "examples") else ""
            prefix = package.group(1) if package else group
            paths.update([prefix] if prefix else [])
            walk(prefix, OmegaConf.to_container(OmegaConf.load(path)))
    return {".".join(p.split(".")[i:]) for p in paths for i in range(len(p.split(".")))}


def _code_reads() -> dict[str, set[str]]:
    """Dotted config reads in fedprog/ -> the files reading them."""
    reads: dict[str, set[str]] = {}
    for path in (config_dir().parent / "fedprog").rglob("*.py"):
        for match in CONFIG_READ.finditer(path.read_text()):
            if match.group(3):
                chain = re.findall(r"[\"'](\w+)[\"']", match.group(3))
            else:
                chain = match.group(1).lstrip(".").split(".")
                if chain[-1] in CONTAINER_METHODS:
                    chain = chain[:-1] + ([match.group(2)] if match.group(2) else [])
            if chain:
                reads.setdefault(".".join(chain), set()).add(path.name)
    return reads


def test_every_key_the_code_reads_is_declared_in_a_config():
    reads = _code_reads()
    assert "training.max_patches" in reads and "rounds" in reads  # the walk sees the code's reads
    declared = _declared_paths()
    undeclared = {key: sorted(files) for key, files in reads.items() if key not in declared}
    assert not set(undeclared) - set(NOT_CONFIG_KEYS), {
        key: files for key, files in undeclared.items() if key not in NOT_CONFIG_KEYS
    }


# ------------------------------------------------------------------------------------------ override checks
@pytest.mark.parametrize("override", ["roundz=3", "+roundz=3"])
def test_unknown_key_names_the_nearest_valid_one_and_never_advises_plus(override):
    with pytest.raises(ConfigError, match=r"^unknown key 'roundz'; did you mean 'rounds'\?$") as error:
        load_config("simulate", [override])
    assert "+" not in str(error.value)


def test_a_key_of_a_group_is_suggested_by_its_full_path():
    with pytest.raises(ConfigError, match="unknown key 'epochs'; did you mean 'training.epochs'"):
        load_config("train", ["epochs=3"])
    with pytest.raises(ConfigError, match="unknown key 'training.epocs'; did you mean 'training.epochs'"):
        load_config("simulate", ["training.epocs=3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rounds=two", "rounds='two': rounds expects int"),
        ("rounds=2.5", "rounds=2.5: rounds expects int"),
        ("training.lr=fast", "training.lr='fast': training.lr expects float"),
        (
            "training.balanced_sampling=1",
            "training.balanced_sampling=1: training.balanced_sampling expects bool",
        ),
        ("heldout=c3", "heldout='c3': heldout expects list"),
        ("rounds=null", "rounds=null: rounds expects int, not null"),
    ],
)
def test_wrong_type_names_key_expected_type_and_value(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("simulate", [override])


def test_bad_group_choice_lists_the_valid_options():
    with pytest.raises(
        ConfigError, match=r"strategy=fedavgg: no such strategy \(valid: .*fedavg, fedprox"
    ) as e:
        load_config("simulate", ["strategy=fedavgg"])
    assert "did you mean 'fedavg'" in str(e.value)


def test_valid_overrides_pass_and_group_keys_follow_the_chosen_option():
    cfg = load_config(
        "simulate",
        [
            "strategy=fedprox",
            "strategy.proximal_mu=0.5",  # declared by strategy=fedprox only
            "heldout=null",  # lists, maps and text take null
            "weighting=null",
            "max_update_norm=null",  # a number whose comment documents null
            "training.max_patches=null",
            "training.lr=1",  # an int is a valid float
            "+data.tables.extra={path: extra.csv}",  # extends an open map
        ],
    )
    assert cfg.strategy.proximal_mu == 0.5 and cfg.heldout is None and cfg.training.max_patches is None
    assert cfg.weighting is None
    assert cfg.data.tables.extra.path == "extra.csv"
    with pytest.raises(ConfigError, match="'strategy.proximal_mu': declared only by strategy=fedprox"):
        load_config("simulate", ["strategy.proximal_mu=0.5"])  # fedavg has no proximal term
