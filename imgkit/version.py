"""imgkit's version, in a module of its own: capture records it in every image's metadata, and the
package's __init__ (which imports the API, which imports capture) re-exports it without a cycle."""
__version__ = "0.1.0"
