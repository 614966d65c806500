"""Adapters for training frameworks: optional, each imports its framework on import.

* :mod:`gradzip.integrations.lightning`: ``GradzipDDPStrategy``, a PyTorch Lightning
  ``DDPStrategy`` that registers gradzip's hook on every device type and keeps the
  compression state in Lightning's checkpoints (``pip install 'gradzip[lightning]'``).
* :mod:`gradzip.integrations.accelerate`: ``register(accelerator, model, codec=...)`` for
  the model Hugging Face Accelerate's ``prepare`` returned (``pip install
  'gradzip[accelerate]'``).

Importing this package imports neither framework.
"""
