"""leanconv's Triton kernels, one file per fused layer (sic, bottleneck, topo) over a shared projection mainloop.

``INTERPRETED``: the kernels were defined under Triton's interpreter (``TRITON_INTERPRET=1`` when
this package was first imported) and run on CPU tensors; otherwise they are compiled for CUDA.
"""
from leanconv.kernels.triton_util import interpreter_requested

INTERPRETED = interpreter_requested()
