"""Data layer: HDF5 image stores, source readers, episode samplers, the supervised adapter."""
