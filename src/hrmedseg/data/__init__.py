"""Sample images that ship with the package (see README.md here for sources and terms)."""
