"""What `imgkit info` says of an image: its format, sizes, partition table, filesystems, OS."""
from __future__ import annotations

from ..views.caching_reader import CachingReader
from .capture import CapturePlan
from ..formats import imgk_layout as L
from ..formats.imgk_reader import ImageReader
from ..stream import Stream


def image_info(stream: Stream) -> dict:
    """What `imgkit info --json` prints. Probing reads (partition tables, filesystem headers) go
    through a caching reader: many small reads of the same few chunks."""
    img = stream.stream if isinstance(stream, CachingReader) else stream
    if isinstance(img, ImageReader):
        meta = img.metadata
        kinds = img.index.kinds()
        counts = {"data": kinds.count(L.KIND_DATA), "zero": kinds.count(L.KIND_ZERO),
                  "free": kinds.count(L.KIND_FREE), "parent": kinds.count(L.KIND_PARENT)}
        stored = img.stored_size()
        from ..formats.imgk_chain import links
        chain = links(img)
        return {
            # Child first: each link's own stored size and what it holds itself (FORMAT.md, *Incremental*).
            "chain": [{"path": link.path, "image_id": link.header.image_id.hex(),
                       "stored_size": link.stored_size(), "created": link.metadata.get("created"),
                       "data_chunks": link.index.kinds().count(L.KIND_DATA),
                       "parent_chunks": link.index.kinds().count(L.KIND_PARENT)} for link in chain],
            "chain_stored_size": sum(link.stored_size() for link in chain),
            "format": "imgk",
            "format_version": f"{img.header.version_major}.{img.header.version_minor}",
            "path": img.path,
            "volumes": [{"path": p, "size": s} for p, s in zip(img.volume_paths, img.volume_sizes)],
            "image_id": img.header.image_id.hex(),
            "virtual_size": img.size,
            "stored_size": stored,
            "ratio": round(img.size / stored, 3) if stored else None,
            "chunk_size": img.chunk_size,
            "chunks": counts,
            "encrypted": img.header.encrypted,
            "stray_volume": img.stray_volume,  # a file named like volume count+1: a mix-up to report
            "created": meta.get("created"),
            "imgkit_version": meta.get("imgkit_version"),
            "source": meta.get("source"),
            "compression": meta.get("compression"),
            "capture": meta.get("capture"),
            "partition_table": meta.get("partition_table"),
            "optical": meta.get("optical"),
            "os": meta.get("os"),
        }
    from .capture import build_metadata  # a raw or foreign disk: describe it on the fly
    from ..formats.qemu_image import QemuImage
    described = img.describe()
    probe = stream if isinstance(stream, CachingReader) else CachingReader(img, 8 << 20)
    try:
        meta = build_metadata(probe, {"path": described.get("path"), "size": img.size}, 0, CapturePlan())
    finally:
        if probe is not stream:
            probe.close()
    doc = {"format": described.get("format", "raw"), "path": described.get("path"),
           "virtual_size": img.size, "partition_table": meta["partition_table"],
           "optical": meta.get("optical"), "os": meta.get("os")}
    if isinstance(img, QemuImage):  # a foreign image: what its own header says
        inspected = img.inspected
        doc.update({"subformat": inspected.subformat, "file_size": inspected.file_size,
                    "format_details": inspected.details})
    return doc
