"""Batches for callbacks that run their own evaluation pass over a loader."""
from __future__ import annotations

from typing import Any, Iterator

import lightning as L


def device_batches(pl_module: "L.LightningModule", loader, limit: int | float | None = None) -> Iterator[tuple[int, Any]]:
    """(i, batch on the module's device) for the first `limit` batches of `loader` (the loop's own
    `limit_*_batches`, so a callback scores what the loop scored)."""
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            return
        yield i, pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
