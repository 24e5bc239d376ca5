"""The stream codecs, one folder each (fields/, bytes/, trellis/), and their registry (registry.py).

A codec's folder holds its plan (what a stream records: parameters and side information), its encoder, and
all its decoders side by side: numpy and constriction, the compiled kernels (native.py: ctypes wrappers of
weightpack/_native.c), and the torch pieces that rebuild its streams on a device (device.py). Its codec.py
is what the registry maps the container's codec name to.
"""
