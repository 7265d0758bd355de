"""Schema versions of the run config and the migrations between them.

A migration is a pure function from a config dict of version N to one of version N+1, registered in MIGRATIONS
under N. `migrate()` applies them in order, so a config saved by any earlier Atelier loads in this one. Bump
SCHEMA_VERSION and add a migration (with a test) whenever a key is renamed, moved or changes meaning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

SCHEMA_VERSION = 1

Migration = Callable[[dict[str, Any]], dict[str, Any]]

# version N -> function producing version N+1. Version 1 is the first published schema: nothing to migrate yet.
MIGRATIONS: dict[int, Migration] = {}


class SchemaVersionError(ValueError):
    """A config whose schema_version cannot be brought to the current one."""


def migrate(
    data: Mapping[str, Any], migrations: Mapping[int, Migration] = MIGRATIONS, current: int = SCHEMA_VERSION,
) -> tuple[dict[str, Any], list[int]]:
    """Bring a config dict to the current schema version.

    A dict without schema_version is taken as current (hand-written files often leave it out).

    Returns:
        The migrated dict and the list of versions it was migrated from, in order.

    Raises:
        SchemaVersionError: for a version from a newer Atelier, a non-integer version, or a gap in the chain.
    """
    result = dict(data)
    version = result.get("schema_version", current)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SchemaVersionError(f"schema_version must be a positive whole number, not {version!r}")
    if version > current:
        raise SchemaVersionError(f"this config was written by a newer Atelier (schema {version}; this one reads up "
                                 f"to {current}); update Atelier to load it")
    applied = []
    while version < current:
        step = migrations.get(version)
        if step is None:
            raise SchemaVersionError(f"no migration from schema {version} to {version + 1}")
        result = step(result)
        applied.append(version)
        version += 1
        result["schema_version"] = version
    result["schema_version"] = current
    return result, applied
