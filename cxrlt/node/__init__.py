"""The DICOM node (`cxrlt dicom-node`): a Storage SCP with a durable spool that has chest
radiographs classified by the server and stores a TID 1500 SR back (C-STORE or STOW-RS).
Needs the `client` extra (pynetdicom, dicomweb-client)."""

# BodyPartExamined values taken as a chest: the one rule set every path applies
# (cxrlt.contract.acceptance); the node's `--body-parts` replaces them.
from cxrlt.contract.acceptance import CHEST_BODY_PARTS  # noqa: F401 (re-exported)
