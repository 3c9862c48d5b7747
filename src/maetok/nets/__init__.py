"""Frozen networks used as teachers, feature extractors and perceptual losses, and how their weights are found."""
