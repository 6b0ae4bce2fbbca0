"""The C-STORE statuses the node answers with, in one table (PS3.4 B.2.3, PS3.7 C).

The conformance statement is generated from this table; a peer's
administrator can tell from the code alone what happened and whether a
re-send can help.
"""

from __future__ import annotations

from enum import IntEnum

from pydicom import Dataset


class StoreStatus(IntEnum):
    """Status codes of the node's Storage SCP; :data:`WHEN_SENT` says when each is sent."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES_DISK = 0xA700
    OUT_OF_RESOURCES_WRITE = 0xA701
    OUT_OF_RESOURCES_QUEUE = 0xA702
    DATASET_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    MISSING_UID = 0xC001
    INVALID_UID = 0xC002
    PROCESSING_FAILURE = 0x0110


WHEN_SENT: dict[StoreStatus, str] = {
    StoreStatus.SUCCESS: "The instance is on disk (fsync'd) and committed in the queue; also for a re-sent "
    "instance already stored (stored once).",
    StoreStatus.OUT_OF_RESOURCES_DISK: "Free space on data_dir is below min_free_disk_mb, or would fall below it "
    "as the data set streams in (checked for each PDU, so an instance larger than the disk is refused while it "
    "arrives and its partial file deleted at once), or the disk filled while writing. The association stays "
    "open. Transient: re-send after space is freed.",
    StoreStatus.OUT_OF_RESOURCES_WRITE: "The instance could not be written (I/O error). Transient once the "
    "administrator has fixed the disk.",
    StoreStatus.OUT_OF_RESOURCES_QUEUE: "The queue database could not record the instance (e.g. locked by "
    "another process for longer than its 30 s busy timeout), or its study is being purged from the node "
    "([storage] keep_days, `queue purge`). Nothing of the instance is kept. Transient.",
    StoreStatus.DATASET_MISMATCH: "SOP Class or SOP Instance UID in the dataset differ from the C-STORE request. "
    "Permanent.",
    StoreStatus.CANNOT_UNDERSTAND: "The dataset cannot be parsed or is truncated. Permanent.",
    StoreStatus.MISSING_UID: "Study, Series, SOP Instance or SOP Class UID absent. Permanent.",
    StoreStatus.INVALID_UID: "A UID that is not digits and dots of at most 64 characters. Permanent.",
    StoreStatus.PROCESSING_FAILURE: "An unexpected error in the node; its log says where. Re-send may help.",
}


def status_dataset(status: StoreStatus, comment: str | None = None) -> Dataset:
    """The status as pynetdicom sends it, with an Error Comment (LO: at most 64 characters)."""
    ds = Dataset()
    ds.Status = int(status)
    if comment and status != StoreStatus.SUCCESS:
        ds.ErrorComment = comment[:64]
    return ds
