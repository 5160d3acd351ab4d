"""Distributed SINQ quantization: plan -> read -> quantize -> reduce -> commit."""
