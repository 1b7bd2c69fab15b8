"""cl-bidsapp: cortical-lesion segmentation in MP2RAGE/MPRAGE MRI with nnU-Net v2, as a BIDS App."""

__version__ = "0.1.0"
__all__ = ["__version__"]
