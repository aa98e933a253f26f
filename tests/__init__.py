"""vlmrec tests: one module per stage, plus end-to-end; each makes its own small data."""
