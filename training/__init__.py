"""DeepSpeed ZeRO-3 rectified-flow trainer for MMDiT models."""
