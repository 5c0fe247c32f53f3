"""moedist: distributed multimodal Mixture-of-Experts recommenders."""
__version__ = "0.1.0"
