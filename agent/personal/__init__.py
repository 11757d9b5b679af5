"""Personalisation on the device: label-free adaptation and enrollment (issue 16)."""
