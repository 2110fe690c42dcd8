"""Bundled data, installed as the package-data subpackage ``tinydiff.datasets`` (package-dir mapping)."""
