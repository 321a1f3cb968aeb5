"""Inference: trained models blended, the ONNX cache, scoring, attributes and the HTTP service.
Uses `core.data`, `core.blend` and the ground. Kept import-free: infer.py's fast path must not
pull torch in through a package."""
