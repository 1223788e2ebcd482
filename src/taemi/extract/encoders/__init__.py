"""Pretrained encoders behind one small interface per role (see :mod:`.base`)."""
