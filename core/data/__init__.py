"""The data every stage reads: labels and their sources, datasets, transforms, clips, folds,
clustering features and test-time views. Uses the ground (`core/*.py`) only."""
