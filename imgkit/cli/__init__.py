"""The click command line: a thin layer over imgkit.api."""
