"""Plain-text corpora shipped as package data (see README.md here for origin and licence)."""
