"""What quantizing one weight costs in memory beyond the weight itself, for planners.

A planner sizes workers (and splits work) from these factors without running anything; the
tests and bench/kernel_memory.py measure each path's real allocations against them.
"""

# GPU bytes the Triton path allocates per byte of a weight's fp16 size (outputs and scratch):
# at most 0.57 measured by bench/kernel_memory.py (2D tiling), 0.48 for 1D.
GPU_WORK_PER_FP16_BYTE = 0.6
# Host bytes the torch (CPU) path holds per weight element: fp32 working copies of the weight,
# its square, the normalised tiles and the codes.
CPU_WORK_PER_ELEMENT = 16
# The error check reconstructs the weight in float32 row blocks of this many elements; the blocks
# and the few temporaries of each stay under ERROR_CHECK_BYTES.
ERROR_BLOCK_ELEMENTS = 1 << 22
ERROR_CHECK_BYTES = 128 << 20
