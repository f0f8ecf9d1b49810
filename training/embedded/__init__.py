"""Tiny-CLIP training: the generated world, real photo sets, captions, the trainers and the shipped recipes."""
