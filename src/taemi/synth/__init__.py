"""Synthetic data with known structure, for tests, the demo and benchmarks: feature stores
(:mod:`.features`) and talking-face media (:mod:`.media`, its speech in :mod:`.speech`, its
face in :mod:`.face`). Only the layers above (the demo, the command line) import it.
"""
