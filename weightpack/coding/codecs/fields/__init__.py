"""The `fields` codec: floats and small integers as sign | head | tail (codec.py says where each piece is)."""
