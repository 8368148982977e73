"""Images in and reports out: the one image loader (DICOM, PNG, JPEG), the JSON / challenge
CSV / DICOM SR writers, and synthetic radiographs. Needs pydicom and highdicom for DICOM."""
