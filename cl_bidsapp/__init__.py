"""cl-bidsapp: cortical-lesion segmentation in MP2RAGE/MPRAGE MRI with nnU-Net v2, as a BIDS App."""
import os as _os

# The app runs offline: Nipype's telemetry (etelemetry) would otherwise look up its server
# the first time an interface runs in each worker process. Set before Nipype is imported.
_os.environ.setdefault("NIPYPE_NO_ET", "1")
_os.environ.setdefault("NO_ET", "1")

__version__ = "0.1.0"
__all__ = ["__version__"]
