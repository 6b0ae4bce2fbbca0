"""The C-STORE statuses the node answers with, in one table (PS3.4 B.2.3, PS3.7 C).

The conformance statement lists these; a peer's administrator can tell from
the code alone what happened and whether a re-send can help.
"""

from __future__ import annotations

from enum import IntEnum

from pydicom import Dataset


class StoreStatus(IntEnum):
    """Status codes of the node's Storage SCP, with when each is sent."""

    SUCCESS = 0x0000
    """On disk (fsync'd) and committed in the queue; also for a re-sent instance already stored."""
    OUT_OF_RESOURCES_DISK = 0xA700
    """Free space on data_dir below min_free_disk_mb, or the disk filled while writing. Transient."""
    OUT_OF_RESOURCES_WRITE = 0xA701
    """The instance could not be written (I/O error). Transient once the administrator fixes the disk."""
    OUT_OF_RESOURCES_QUEUE = 0xA702
    """The queue database could not record the instance (locked too long, I/O error). Transient."""
    DATASET_MISMATCH = 0xA900
    """SOP Class or Instance UID in the dataset differ from the C-STORE request. Permanent."""
    CANNOT_UNDERSTAND = 0xC000
    """The dataset cannot be parsed or is truncated. Permanent."""
    MISSING_UID = 0xC001
    """Study, Series, SOP Instance or SOP Class UID absent. Permanent."""
    INVALID_UID = 0xC002
    """A UID that is not digits and dots of at most 64 characters. Permanent."""
    PROCESSING_FAILURE = 0x0110
    """An unexpected error in the node; the node's log has the details."""


def status_dataset(status: StoreStatus, comment: str | None = None) -> Dataset:
    """The status as pynetdicom sends it, with an Error Comment (LO: at most 64 characters)."""
    ds = Dataset()
    ds.Status = int(status)
    if comment and status != StoreStatus.SUCCESS:
        ds.ErrorComment = comment[:64]
    return ds
