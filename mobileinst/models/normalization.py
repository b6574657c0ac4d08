"""The network's input normalisation, in one place below every backbone and the network.

Images go in as RGB 0..255 and the network computes (x - PIXEL_MEAN) / PIXEL_STD itself (the ImageNet
statistics: the reproduction config's and TopFormer/SeaFormer's, mobileinst.md), so an exported graph
takes raw pixels. A backbone whose weights were trained on another scale maps this input to its own
(`efficientnet_lite.py`).
"""
from __future__ import annotations

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
