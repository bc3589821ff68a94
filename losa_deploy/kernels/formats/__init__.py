"""Packed weight formats, each described once (byte layout, pack, unpack).

Kernels, exporters and the vLLM plugin import these descriptions; nobody re-derives a layout.
"""
