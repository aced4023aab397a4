"""Data sources, record formats, cleaning and augmentation for grain pipelines."""
