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

    Shapes do not depend on the data (no host read): the tensors have a row per copy, and only a
    prefix is meaningful, whose length comes with the exchange's split sizes.

    Attributes:
        token_U: token of each unique (node, token) row, sorted by (node, token): the rows for node v
            are one contiguous block, sent to the proxy on v. The first ``count_V.sum()`` rows.
        count_V: int64 [V], unique rows per destination node.
        meta_N2: int32 [N, 2] per copy in plan order: (row inside its node's block, expert). The
            kept copies' rows (all, or a padded plan's first ``counts_E.sum()``).
    """

    token_U: Tensor
    count_V: Tensor
    meta_N2: Tensor


def dedup_by_node(token_N: Tensor, expert_N: Tensor, num_tokens: int, experts_per_node: int,
                  num_nodes: int, kept_N: Tensor | None = None) -> NodeRows:
    """Deduplicates the plan's copies (sorted by expert, hence by node) into unique (node, token) rows.

    ``kept_N`` (bool, per copy): copies that are not kept (a padded plan's tail) count for no node.
    ``torch.unique`` would do the same with an output shape that depends on the data (a host read
    on GPUs); a sort and a first-of-its-key flag keep every shape fixed.
    """
    node_N = torch.div(expert_N, experts_per_node, rounding_mode="floor")
    if kept_N is not None:  # dropped copies go to a node past the last: sorted last, counted nowhere
        node_N = torch.where(kept_N, node_N, num_nodes)
    key_sorted, order_N = torch.sort(node_N * num_tokens + token_N, stable=True)
    first_N = torch.ones_like(key_sorted, dtype=torch.bool)
    first_N[1:] = key_sorted[1:] != key_sorted[:-1]
    unique_sorted = torch.cumsum(first_N, 0) - 1  # the unique row of each sorted copy
    row_N = torch.empty_like(unique_sorted).scatter_(0, order_N, unique_sorted)
    key_U = torch.zeros_like(key_sorted).scatter_(0, unique_sorted, key_sorted)  # duplicates agree
    node_U = torch.div(key_U, num_tokens, rounding_mode="floor")
    node_sorted = torch.div(key_sorted, num_tokens, rounding_mode="floor")
    # index_add instead of bincount, which reads its maximum back to the host on GPUs
    count_V = torch.zeros(num_nodes + 1, dtype=torch.int64, device=node_N.device).index_add_(
        0, node_sorted, first_N.long())[:num_nodes]
    start_V = torch.cumsum(count_V, 0) - count_V
    in_block_N = row_N - start_V[node_N.clamp(max=num_nodes - 1)]
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
