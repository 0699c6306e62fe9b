"""Layer 3, communication: the only place that calls collectives.

``distributed`` (launcher detection, ``init_distributed``, the (dp, ep) mesh), ``exchange`` (the
all-to-all dispatcher with autograd and error context), ``grads`` (gradient sync and global norms),
``shutdown`` (the end of a job).
"""
