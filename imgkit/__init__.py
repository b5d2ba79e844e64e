"""imgkit: capture, restore, convert, mount and boot-check disk images.

The Python API (the CLI is a thin layer over it):

    import imgkit
    with imgkit.open_image("disk.imgk") as img:      # a Stream: size, read(offset, n), runs()
        data = img.read(0, 512)
    imgkit.capture("/dev/sdb", "disk.imgk", level=3)
    imgkit.restore("disk.imgk", "disk.raw", yes=True)
    report = imgkit.verify("disk.imgk")
"""
from .version import __version__  # noqa: F401

_API = ("capture", "image_info", "open_image", "restore", "verify")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """The API functions, imported from api.py on first use (PEP 562): every CLI command imports
    this package, and api.py pulls in every operation (about 60 ms before `imgkit convert` starts)."""
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'imgkit' has no attribute {name!r}")
