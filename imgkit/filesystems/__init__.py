"""Filesystem detection and (later) used-block maps, one module per filesystem."""
