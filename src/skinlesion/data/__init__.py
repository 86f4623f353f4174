"""Data layer: HAM10000 layouts, validation, split, image cache, transforms, datasets, synthetic data."""
