"""Reading what the queue needs from a received dataset, and refusing what cannot be stored.

The receiver streams each dataset to a spool file (pynetdicom's chunked
receive), so this reads that file's top-level elements once, with values over
512 bytes skipped, never loading pixel data. The same pass checks that no
element runs past the end of the data, which catches a dataset cut short on
the wire (pydicom itself reads a truncated value without complaint).
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.charset import convert_encodings
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from triagenode.daemon.statuses import StoreStatus
from triagenode.storage.filestore import is_valid_uid

_UNDEFINED_LENGTH = 0xFFFFFFFF
_DEFER_BYTES = 512
_REQUEST_ATTRIBUTES = Tag(0x0040, 0x0275)
"""Request Attributes Sequence, where modalities put Requested Procedure Priority (STAT)."""
_META_START = 132
"""128-byte preamble + b"DICM": where pynetdicom's spool file has its file meta."""

_PARSE_ERRORS = (
    InvalidDicomError,
    ValueError,  # bad values, bad encodings (UnicodeDecodeError), bad lengths
    EOFError,
    NotImplementedError,  # an encoding pydicom does not read
    struct.error,
    zlib.error,
)
"""What pydicom raises for bad data: the peer's problem, 0xC000. Anything else is a bug in the node
(0x0110, with its traceback in the log), never blamed on the peer's data set."""


class RefusedDatasetError(Exception):
    """A dataset the node will not store; carries the DIMSE status to answer with.

    ``detail`` must never hold attribute values other than UIDs: it is logged
    and sent to the peer as the Error Comment.
    """

    def __init__(self, status: StoreStatus, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class IncomingHeader:
    """The attributes of a received instance that the queue records, and what the audit trail names.

    The patient's identifiers (``patient_id``, ``patient_name``) are read for the audit messages
    alone, which must name the patient (PS3.15 A.5.2.7); they are never logged nor recorded in
    the queue, and left out of ``repr`` so that no log line can carry them by accident.
    """

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None
    study_date: str | None
    study_description: str | None
    series_number: int | None
    series_description: str | None
    body_part: str | None = None
    """(0018,0015) Body Part Examined, for routing to models."""
    urgent: bool = False
    """(0040,1003) Requested Procedure Priority is STAT (top level, or in the Request Attributes Sequence)."""
    patient_id: str = dataclasses.field(default="", repr=False)
    patient_name: str = dataclasses.field(default="", repr=False)
    accession_number: str = dataclasses.field(default="", repr=False)


def read_incoming(
    path: Path, transfer_syntax: str, affected_sop_class: str, affected_sop_instance: str
) -> IncomingHeader:
    """Parse the spool file and check it against the C-STORE request, or raise :class:`RefusedDatasetError`.

    ``transfer_syntax`` is the accepted presentation context's: the encoding
    of the dataset bytes in the spool file.
    """
    try:
        ds = _read_top_level(path, UID(transfer_syntax))
        # UIDs are read whole: one cut to 64 characters would pass the check
        # below, and two studies differing after character 64 would merge.
        uids = {
            "Study Instance UID": _text(ds, "StudyInstanceUID", None),
            "Series Instance UID": _text(ds, "SeriesInstanceUID", None),
            "SOP Instance UID": _text(ds, "SOPInstanceUID", None),
            "SOP Class UID": _text(ds, "SOPClassUID", None),
        }
        header = IncomingHeader(
            study_uid=uids["Study Instance UID"] or "",
            series_uid=uids["Series Instance UID"] or "",
            sop_instance_uid=uids["SOP Instance UID"] or "",
            sop_class_uid=uids["SOP Class UID"] or "",
            modality=_text(ds, "Modality", 16),
            study_date=_text(ds, "StudyDate", 8),
            study_description=_text(ds, "StudyDescription", 64),
            series_number=_integer(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription", 64),
            body_part=_text(ds, "BodyPartExamined", 16),
            urgent=_is_stat(ds),
            patient_id=_text(ds, "PatientID", 64) or "",
            patient_name=_text(ds, "PatientName", 324) or "",
            accession_number=_text(ds, "AccessionNumber", 16) or "",
        )
        if not header.urgent and _REQUEST_ATTRIBUTES in ds and ds.get("RequestAttributesSequence") is None:
            # A sequence longer than _DEFER_BYTES is left unread above; STAT may sit in it.
            requests = dcmread(path, stop_before_pixels=True, specific_tags=[_REQUEST_ATTRIBUTES])
            header = dataclasses.replace(header, urgent=_is_stat(requests))
    except _PARSE_ERRORS as exc:
        raise RefusedDatasetError(
            StoreStatus.CANNOT_UNDERSTAND, f"dataset cannot be parsed ({type(exc).__name__})"
        ) from exc
    missing = [name for name, value in uids.items() if not value]
    if missing:
        raise RefusedDatasetError(StoreStatus.MISSING_UID, f"dataset lacks {', '.join(missing)}")
    invalid = [name for name, value in uids.items() if not is_valid_uid(value)]
    if invalid:
        raise RefusedDatasetError(
            StoreStatus.INVALID_UID, f"{', '.join(invalid)} not digits and dots of at most 64 characters"
        )
    if header.sop_class_uid != affected_sop_class or header.sop_instance_uid != affected_sop_instance:
        raise RefusedDatasetError(
            StoreStatus.DATASET_MISMATCH, "SOP Class/Instance UID in the dataset differ from the C-STORE request"
        )
    return header


def _read_top_level(path: Path, syntax: UID) -> Dataset:
    """The dataset's top-level elements, large values left unread, refusing a truncated one."""
    with open(path, "rb") as fp:
        fp.seek(_META_START)
        group_length = fp.read(12)  # (0002,0000) UL, length 4, value: as pynetdicom writes the meta
        if len(group_length) != 12 or group_length[:6] != b"\x02\x00\x00\x00UL":
            raise InvalidDicomError("the spool file has no file meta group length")
        dataset_start = _META_START + 12 + struct.unpack("<I", group_length[8:])[0]
        if syntax == DeflatedExplicitVRLittleEndian:
            # pydicom inflates the whole stream; a cut-short one fails in zlib.
            return dcmread(path, defer_size=_DEFER_BYTES)
        size = fp.seek(0, os.SEEK_END)
        fp.seek(dataset_start)
        elements = {}
        for element in data_element_generator(
            fp, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=_DEFER_BYTES
        ):
            length = getattr(element, "length", _UNDEFINED_LENGTH)  # sequences come parsed, without one
            if length != _UNDEFINED_LENGTH and element.value_tell + length > size:
                raise RefusedDatasetError(
                    StoreStatus.CANNOT_UNDERSTAND, f"dataset truncated: element {element.tag} runs past its end"
                )
            elements[element.tag] = element
        if fp.tell() > size:
            raise RefusedDatasetError(StoreStatus.CANNOT_UNDERSTAND, "dataset truncated inside an element")
    ds = Dataset(elements)
    # Text values decode with pydicom's own handling of Specific Character Set
    # (ISO_IR 192, ISO 2022 with an empty first value, ...), not a codec alias.
    charset = ds.get("SpecificCharacterSet")
    ds.set_original_encoding(
        syntax.is_implicit_VR, syntax.is_little_endian, convert_encodings(charset) if charset else None
    )
    return ds


def _text(ds: Dataset, keyword: str, limit: int | None = 64) -> str | None:
    """The first value as a stripped string (at most ``limit`` characters); None when absent or empty."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if not isinstance(value, str) and hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        value = value[0] if len(value) else ""
    return str(value).strip().rstrip("\x00")[:limit] or None


def _is_stat(ds: Dataset) -> bool:
    """Whether the instance's Requested Procedure Priority says STAT, where modalities put it."""
    places = [ds, *(ds.get("RequestAttributesSequence") or [])]
    return any((_text(item, "RequestedProcedurePriority", 16) or "").upper() == "STAT" for item in places)


def _integer(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None
