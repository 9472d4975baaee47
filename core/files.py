"""Files that appear whole or not at all."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A scratch file beside `path` that replaces it whole when the block ends, and is removed if the block fails.

    Why: a reader (another process seeding the demo into the same folder, an analyst opening the CLI's output)
    must see the previous file or the new one, never half of one, and a failed write must leave no litter."""
    scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield scratch
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
