"""An organization's files on this server, and the rule that keeps each org to its own.

Synced bundles live under `<data dir>/orgs/<org id>/`. A bundle folder a service is asked to read
for one org (its data source, a `bundle_dir` or `base_bundle` argument) may not lie in another
org's folder there, however the path is written: it is resolved first (`..`, symlinks), and so is
every file in it (a folder of links into another org's bundle is no way round).
"""

from __future__ import annotations

from pathlib import Path

from db.session import data_dir
from services.errors import InvalidInput


def org_folder(org_id: int) -> Path:
    return data_dir() / "orgs" / str(org_id)


def own_bundle(org_id: int, path: Path | str, field: str) -> Path:
    """`path`, refused (InvalidInput naming `field`) when it, or a file in it, reaches into another organization's
    folder."""
    resolved = Path(path).resolve()
    orgs, own = (data_dir() / "orgs").resolve(), org_folder(org_id).resolve()

    def foreign(target: Path) -> bool:
        return target.is_relative_to(orgs) and not target.is_relative_to(own)

    if foreign(resolved):
        raise InvalidInput(f"{field}: {path} is not this organization's: it lies in the server's folder of "
                           f"organizations, outside this one's own")
    if resolved.is_dir() and any(foreign(child.resolve()) for child in resolved.iterdir()):
        raise InvalidInput(f"{field}: {path} links to files of another organization")
    return resolved
