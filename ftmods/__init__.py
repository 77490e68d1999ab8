"""ftmods: PyTorch Lightning modules and callbacks for modern fine-tuning methods."""

__version__ = "0.1.0"
