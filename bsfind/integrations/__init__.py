"""Thin adapters of :mod:`bsfind.tracker` to training frameworks.

Each module imports its framework at import time, so it is loaded only when you
name it (``import bsfind`` never imports any of them):

- :mod:`bsfind.integrations.lightning`: ``NoiseScaleMonitor``, a Lightning Callback
  (``pip install 'bsfind[lightning]'``);
- :mod:`bsfind.integrations.transformers`: ``NoiseScaleCallback``, a Hugging Face
  ``TrainerCallback`` (``pip install 'bsfind[transformers]'``).
"""
