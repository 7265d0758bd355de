"""The schema-version machinery: chains of migrations, files without a version, files from the future."""

import pytest

from engine.config.migrations import MIGRATIONS, SCHEMA_VERSION, SchemaVersionError, migrate


def test_every_version_below_the_current_one_has_a_migration():
    assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION))


def test_chain_applies_each_step_in_order():
    # A hypothetical history: v1 named the key `epochs`, v2 moved it into [training].
    history = {
        1: lambda data: {**{k: v for k, v in data.items() if k != "epochs"}, "max_epochs": data["epochs"]},
        2: lambda data: {**{k: v for k, v in data.items() if k != "max_epochs"},
                         "training": {"max_train_epochs": data["max_epochs"]}},
    }
    migrated, applied = migrate({"schema_version": 1, "epochs": 4}, history, current=3)
    assert migrated == {"schema_version": 3, "training": {"max_train_epochs": 4}}
    assert applied == [1, 2]


def test_missing_version_is_taken_as_current():
    migrated, applied = migrate({"method": "lora"})
    assert migrated == {"method": "lora", "schema_version": SCHEMA_VERSION} and applied == []


@pytest.mark.parametrize(("version", "fragment"), [(SCHEMA_VERSION + 1, "newer Atelier"), ("1", "whole number"),
                                                   (0, "whole number"), (True, "whole number")])
def test_unusable_versions_are_refused(version, fragment):
    with pytest.raises(SchemaVersionError, match=fragment):
        migrate({"schema_version": version})


def test_gap_in_the_chain_is_an_error():
    with pytest.raises(SchemaVersionError, match="no migration from schema 1"):
        migrate({"schema_version": 1}, {}, current=2)
