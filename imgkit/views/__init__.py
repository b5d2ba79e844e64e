"""Views: how an image is read and shown: the one caching read engine, the file tree of a mount, the NBD export."""
