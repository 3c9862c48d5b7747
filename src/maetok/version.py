"""The package version, in a module of its own so that every layer can record it without importing the package
face (`maetok/__init__.py` imports the models, which would make a cycle)."""
__version__ = "0.1.0"
