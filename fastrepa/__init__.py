"""fastrepa: fast, faithful training and sampling of REPA-family diffusion transformers."""
__version__ = "0.1.0"
