"""The DICOM node (`cxrlt dicom-node`): a Storage SCP with a durable spool that has chest
radiographs classified by the server and stores a TID 1500 SR back (C-STORE or STOW-RS).
Needs the `client` extra (pynetdicom, dicomweb-client)."""

# BodyPartExamined values taken as a chest (upper case, matched as substrings); an empty or
# absent BodyPartExamined is accepted. Local terms exist (TORAX, PECHO): `--body-parts` extends them.
CHEST_BODY_PARTS = ("CHEST", "THORAX", "TORAX", "LUNG", "PECHO", "TORACE")
