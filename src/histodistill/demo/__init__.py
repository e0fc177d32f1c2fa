"""Demo data generators, all deterministic from a seed: nothing here is read from outside.

- `slides`: synthetic H&E-like whole-slide images (pyramidal TIFF with µm/px), demo cohorts, stain and
  scanner simulation.
- `plism`: the PLISM-like set, one tissue under several scanners × stainings with known warps.
- `mitosis`: slides with annotated mitotic figures and hard negatives in visually different domains.
- `tasks`: benchmark tasks labelled from tissue content (patch classification, HEST-like expression).
"""
