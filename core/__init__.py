"""Shared library code, grouped by stage so the path names the room.

- `core/*.py`, the ground every stage stands on: io, config, log, progress, imaging, device,
  metrics, checkpoints, recorded preprocessing, reports, read-ahead, DDP, trained folds on disk;
- `core.data`: labels, sources, datasets, transforms, clips, folds, clustering, features, TTA views;
- `core.train`: the trainer, SAM, tuning, prediction;
- `core.infer`: the blended trained models, the ONNX cache, scoring, attributes, the service;
- `core.blend`: members' predictions and the submission, blend fitting, the applied fit, the report.

Imports go one way: `train` and `infer` may use `data` and `blend`; every stage uses the ground;
the ground uses no stage; `core` imports nothing from `models`, `data_prep` or the entry points
(tests/test_architecture.py checks it).
"""
