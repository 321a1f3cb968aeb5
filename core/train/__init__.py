"""Training: the trainer, SAM, hyper-parameter tuning and out-of-fold prediction.
Uses `core.data`, `core.blend` and the ground."""
