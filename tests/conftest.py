"""Test configuration: Triton kernels run in interpreter mode on the CPU.

TRITON_INTERPRET must be set before anything imports triton, so it is set here, at collection time.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
