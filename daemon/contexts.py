"""The presentation contexts the node accepts: the table the conformance statement is built from.

Every storage SOP class pynetdicom knows, each with the uncompressed and the
common compressed transfer syntaxes, so a modality's or a PACS's data is
stored exactly as it was sent (never re-encoded), plus Verification.
"""

from __future__ import annotations

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

ACCEPTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
)
"""Transfer syntaxes accepted for every storage SOP class, in order of preference."""

VERIFICATION_TRANSFER_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

STORAGE_SOP_CLASSES: tuple[UID, ...] = tuple(
    UID(context.abstract_syntax) for context in AllStoragePresentationContexts if context.abstract_syntax
)
"""Every storage SOP class pynetdicom knows (CT, MR, MG, DX, CR, PET, SC, SR, SEG, ...)."""

VERIFICATION_SOP_CLASS = UID(Verification)
