"""Data: discovery of samples and splits, image decoding and caching, transforms, the DataModule."""
