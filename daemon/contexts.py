"""The presentation contexts the node accepts: the table the conformance statement is built from.

Every storage SOP class pynetdicom knows, each with the uncompressed and the
common compressed transfer syntaxes, so a modality's or a PACS's data is
stored exactly as it was sent (never re-encoded), plus Verification.
"""

from __future__ import annotations

from pydicom import uid
from pydicom.uid import UID
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

ACCEPTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
)
"""Transfer syntaxes accepted for every storage SOP class, in order of preference."""

VERIFICATION_TRANSFER_SYNTAXES: tuple[UID, ...] = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian)

STORAGE_SOP_CLASSES: tuple[UID, ...] = tuple(
    UID(context.abstract_syntax) for context in AllStoragePresentationContexts if context.abstract_syntax
)
"""Every storage SOP class pynetdicom knows (CT, MR, MG, DX, CR, PET, SC, SR, SEG, ...)."""

VERIFICATION_SOP_CLASS = UID(Verification)
