"""pyproject.toml and envs/*.yaml must pin the same versions (one source of truth for provenance)."""

import re
import tomllib

import yaml

from tests.conftest import REPO


def _pins(specs):
    out = {}
    for spec in specs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-\[\]]+?)\s*==\s*([^\s;]+)\s*", spec)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_every_env_pin_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = _pins(project["dependencies"] + project["optional-dependencies"]["test"])
    assert len(pinned) == len(project["dependencies"]) + len(project["optional-dependencies"]["test"]), (
        "every dependency in pyproject.toml is pinned with =="
    )
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert {p.stem for p in envs} >= {"wsi", "registration", "torch", "bench"}
    for env in envs:
        spec = yaml.safe_load(env.read_text())
        pips = [d for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d]
        assert pips, f"{env.name} has no pip section"
        env_pins = _pins(pips[0]["pip"])
        assert env_pins, f"{env.name} pins nothing"
        for name, ver in env_pins.items():
            assert name in pinned, f"{env.name}: {name} is not a dependency in pyproject.toml"
            assert pinned[name] == ver, f"{env.name}: {name}=={ver} but pyproject.toml pins {pinned[name]}"
        python = [d for d in spec["dependencies"] if isinstance(d, str) and d.startswith("python")]
        assert python == ["python=3.11"], f"{env.name}: pin python=3.11"
