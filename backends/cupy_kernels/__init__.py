"""The fast kernels of the CuPy backend, beside its adapter (``backends/cupy.py``).

Each kernel has a Python module that plans and launches it and its CUDA source
in a ``.cu`` file of this folder, installed as package data.
"""
