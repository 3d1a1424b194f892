"""Export of tokdrop models as full-sequence encoders (installed as ``tokdrop.export``)."""
