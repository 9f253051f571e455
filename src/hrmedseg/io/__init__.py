"""Lazy reading and atomic writing of large images."""
