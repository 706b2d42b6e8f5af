"""Benchmarks against the procedural world's exact ground truth (definitions: docs/metrics.md).

* :func:`dreamlab.bench.prior_quality.run_prior_bench`: does the 2D prior draw the asked object
  and view? (``dreamlab bench prior``)
* :func:`dreamlab.bench.quality.run_quality_bench`: do generated 3D objects match the truth in
  silhouette, colour, Janus-freedom and mesh topology? (``dreamlab bench quality``)

Not to be confused with the top-level ``bench/`` scripts, which time single components.
"""
