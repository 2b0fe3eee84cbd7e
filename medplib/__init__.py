"""medplib: MLOps platform for MedPLIB-style biomedical pixel-level multimodal models."""
__version__ = "0.1.0"
