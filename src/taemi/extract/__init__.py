"""Per-clip media decoding and face cropping: the first step of media -> features."""
