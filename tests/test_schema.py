"""configs/schema.json, the experiment's JSON Schema for editors: generated from the schema the
loader uses (never stale), accepting every shipped recipe, refusing what the loader refuses
by key."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import REPO

from dskd.commands.schema import experiment_schema, schema_text
from dskd.errors import DskdError
from dskd.methods import load_experiment

jsonschema = pytest.importorskip("jsonschema", reason="the test extra installs jsonschema (pip install -e '.[test]')")
SHIPPED = REPO / "configs" / "schema.json"
RECIPES = sorted(p for p in (REPO / "configs").rglob("*.yaml"))


def validator():
    return jsonschema.Draft202012Validator(experiment_schema())


def test_the_shipped_schema_is_the_generated_one():
    assert SHIPPED.read_text() == schema_text(), "configs/schema.json is stale: run `dskd schema --output configs/schema.json`"
    jsonschema.Draft202012Validator.check_schema(json.loads(SHIPPED.read_text()))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_recipe_is_valid(recipe):
    errors = [e.message for e in validator().iter_errors(yaml.safe_load(recipe.read_text()))]
    assert not errors, errors


@pytest.mark.parametrize("edit, path", [
    ({"training": {"learning_rate": 1e-3}}, ["training"]),  # a misspelled key
    ({"training": {"lr": "fast"}}, ["training", "lr"]),  # a wrong type
    ({"losses": {"soft_kd": {"weight": 1.0, "temprature": 2.0}}}, ["losses", "soft_kd"]),  # a term's key
    ({"losses": {"mine": {"weight": 1.0}}}, ["losses", "mine"]),  # an unknown term without `type`
    ({"schedule": [{"name": "a", "epochs": 1, "per_layer": "sideways"}]}, ["schedule", 0, "per_layer"]),
])
def test_what_the_loader_refuses_the_schema_refuses_at_the_same_key(tmp_path, edit, path):
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    for section, value in edit.items():
        config[section] = {**config[section], **value} if isinstance(value, dict) and section in config else value
    errors = list(validator().iter_errors(config))
    assert errors and [list(e.absolute_path) for e in errors] == [path], [(list(e.absolute_path), e.message) for e in errors]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(DskdError):
        load_experiment(tmp_path / "c.yaml")
