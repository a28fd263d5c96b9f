"""Segmentation masks for local style transfer (FastSAM through ultralytics), mask selection and
mask-wise fusion. Filled by the DiffStyler work."""
