"""The math of the hierarchical exchange: routed copies deduplicated per node and fanned out again.

The expert-parallel group spans V nodes of P ranks (ranks contiguous per node, rank r on node r // P);
expert x lives on rank x // e and so on node x // (e·P). A token whose K copies go to experts on the
same remote node needs to cross the network once, not once per copy:

- the source sends each (node, token) pair once, as one row ``U``, to its *proxy* on that node (the
  rank there with the source's local index), with per-copy metadata: which of those rows, which
  expert, and the gate;
- the proxy fans the rows out to the copies ``H`` its node's experts run (sorted by expert, so each
  owner receives one expert-major block per proxy);
- on the way back the proxy sums its copies' gate-weighted outputs per row, and only that partial sum
  crosses back; the source adds the partial sums of its nodes into the token.

No communication here: the collectives are in ``comm.exchange``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class NodeRows:
    """One rank's routed copies deduplicated per destination node (source side).

    Attributes:
        token_U: token of each unique (node, token) row, sorted by (node, token): the rows for node v
            are one contiguous block, sent to the proxy on v.
        count_V: int64 [V], unique rows per destination node.
        meta_N2: int32 [N, 2] per kept copy in plan order: (row inside its node's block, expert).
    """

    token_U: Tensor
    count_V: Tensor
    meta_N2: Tensor


def dedup_by_node(token_N: Tensor, expert_N: Tensor, num_tokens: int, experts_per_node: int,
                  num_nodes: int) -> NodeRows:
    """Deduplicates the plan's copies (sorted by expert, hence by node) into unique (node, token) rows."""
    node_N = torch.div(expert_N, experts_per_node, rounding_mode="floor")
    key_U, row_N = torch.unique(node_N * num_tokens + token_N, sorted=True, return_inverse=True)
    node_U = torch.div(key_U, num_tokens, rounding_mode="floor")
    # index_add instead of bincount, which reads its maximum back to the host on GPUs
    count_V = torch.zeros(num_nodes, dtype=torch.int64, device=node_U.device).index_add_(
        0, node_U, torch.ones_like(node_U))
    start_V = torch.cumsum(count_V, 0) - count_V
    in_block_N = row_N - start_V[node_N]
    meta_N2 = torch.stack([in_block_N, expert_N]).t().to(torch.int32)
    return NodeRows(key_U - node_U * num_tokens, count_V, meta_N2)


@dataclass(frozen=True)
class FanOut:
    """How a proxy forwards the copies it received to its node's experts.

    Attributes:
        order_H: received copy index of each forwarded copy, sorted by expert (stable: by source,
            then the source's order).
        row_H: row of the received unique-row buffer that each forwarded copy reads.
    """

    order_H: Tensor
    row_H: Tensor


def fan_out(meta_H2: Tensor, copies_R: Tensor, rows_R: Tensor) -> FanOut:
    """Orders a proxy's received copies by expert and points each at its received row.

    Args:
        meta_H2: the received (row inside the source's block, expert) of each copy, sources in order.
        copies_R: int64, copies received from each source.
        rows_R: int64, unique rows received from each source (the block sizes of the rows).
    """
    start_R = torch.cumsum(rows_R, 0) - rows_R
    start_H = torch.repeat_interleave(start_R, copies_R, output_size=int(meta_H2.shape[0]))
    row_H = meta_H2[:, 0].long() + start_H
    order_H = torch.argsort(meta_H2[:, 1], stable=True)
    return FanOut(order_H, row_H[order_H])


__all__ = ["FanOut", "NodeRows", "dedup_by_node", "fan_out"]
