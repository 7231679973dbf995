"""fedprog: federated multimodal cancer prognosis with SDIR and CADE."""

__version__ = "0.1.0"
