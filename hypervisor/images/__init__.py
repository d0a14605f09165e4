"""Image tools: `hvlab image info | verify | make` as library functions (docs/images.md).

* :func:`image_info` -- what an image holds (streaming; any size)
* :func:`image_verify` -- structure and page-table validity, without running the guest
* :func:`image_make` -- generate a large PV guest image (mostly XALLOC) around a
  small workload kernel
"""

from .common import ImageError
from .guest_layouts import LAYOUTS
from .info import image_info
from .make import image_make
from .verify import image_verify

__all__ = ["LAYOUTS", "ImageError", "image_info", "image_make", "image_verify"]
