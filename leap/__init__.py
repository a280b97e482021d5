"""LEAP trainer: truncated teacher, adaptive curriculum, training loop."""
