"""vlmrec: a candidate producer. A VLM teacher embeds products; a SASRec student distilled into that space
turns a user's click sequence into a vector; Qdrant returns the nearest products; Ray Serve serves it.

Stages (each a `vlmrec <stage>` subcommand and a `python -m` module):
ingest -> embed -> features -> train -> evaluate -> index -> serve.
"""

__version__ = "0.1.0"
