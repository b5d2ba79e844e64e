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
from .api import capture, image_info, open_image, restore, verify  # noqa: E402,F401
