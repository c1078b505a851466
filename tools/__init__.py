"""User tools run with `python -m tools.<name>`: each composes pipelines into one command."""
