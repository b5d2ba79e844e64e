"""What a writer of an imgk image chooses: the zstd level presets and range the CLI offers, and the
default chunk size. Apart from imgk_writer.py so that the commands declaring these options, and the
modules sizing things by the chunk, do not load the writer (and what it imports) unless an imgk image
is being written."""
from __future__ import annotations

# Compression levels: the presets the CLI names, and the range python-zstandard accepts.
LEVEL_NONE = 0
LEVEL_FAST = 1
LEVEL_DEFAULT = 3
LEVEL_HIGH = 19
MIN_LEVEL, MAX_LEVEL = -7, 22
# 2 MiB: every chunk is an independent zstd frame, so a chunk boundary forgets the history a stream
# compressor would keep. Measured on bench input B (ext4, 548 MiB used, zstd -3): 1 MiB chunks 212.0 MiB,
# 2 MiB 206.0, 4 MiB 202.9, one stream 199.8 (partclone|zstd 202.2) at the same speed; 2 MiB keeps the
# size within 2% of the streaming peers while a cold random read decodes only 2 MiB (--chunk-size 64K
# for images meant for random access).
DEFAULT_CHUNK_SIZE = 2 << 20
