"""Hand-written Triton kernels, installed as ``lowprec.kernels``.

Every kernel sits beside a PyTorch reference that is both the CPU path and the
test oracle; :mod:`lowprec.kernels.dispatch` picks one per call.
"""
