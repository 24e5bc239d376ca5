"""The `trellis` codec: the levels of trellis-coded quantization (codec.py says where each piece is)."""
