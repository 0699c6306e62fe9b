"""Layer 2, the math of an MoE layer, no communication: router → plan → dispatch/combine → experts.

``routing`` (routers, groups, capacity, gates), ``plan`` (the routing plan every router produces),
``dispatch`` (rows to experts and weighted outputs back, on one rank), ``experts`` (grouped expert
GEMMs and the dense FeedForward), ``losses`` (aux losses and statistics). None of these modules
imports ``torch.distributed`` (tests/test_layering.py holds it).
"""
