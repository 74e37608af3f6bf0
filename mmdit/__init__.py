"""SD3-style MMDiT model family. Kept light: importing mmdit pulls in torch only."""

from mmdit.model import MMDiT, MMDiTConfig

__all__ = ["MMDiT", "MMDiTConfig"]
