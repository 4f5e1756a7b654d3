"""Sample-quality metrics: FID/KID with the standard Inception network, sharded over ranks.

``features`` (extractors, resizing), ``quality`` (FID/KID statistics, reference cache),
``weights`` (where the Inception weights live; ``python -m flowerdiff.metrics.weights`` fetches
them). Nothing is imported here, so that ``-m flowerdiff.metrics.weights`` runs cleanly.
"""
