"""The Feast feature repository of vlmrec: definitions in features.py, store configs in *.yaml."""
