"""The `bytes` codec: a chunk's bytes grouped into byte planes, stored raw or with zstd (codec.py). Its chunks
decode on the host only (a device decoder copies them up)."""
