"""Teacher tuning (`vlmrec tune`, teacher/tune/cli.py): configs -> model -> loop -> export."""
