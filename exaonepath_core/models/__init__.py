"""Backbones: timm ViT builders, checkpoint loading, peers' released layouts."""
