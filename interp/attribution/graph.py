"""The computational graph of a HookedTransformer: nodes, edges, and a score per edge.

**Nodes.** `input` (the embeddings: the residual stream entering layer 0), each attention head
`a{L}.h{H}`, each MLP `m{L}`, and `logits` (the final residual stream, before `ln_final`).

**Edges.** Every node but `logits` is a *sender*: it writes its output into the residual
stream. Every node but `input` is a *receiver*: it reads the residual stream as its input (a
head's input, its q, k and v inputs separately with `qkv_inputs=True`; the MLP input; the final
residual). Since the residual stream is the sum of everything written before, sender `s` reaches
receiver `r` directly exactly when `s` writes before `r` reads:

- a head of layer L reads the stream entering L, so it receives from `input`, every head and
  MLP of layers < L; heads of one layer do not feed each other;
- MLP L reads the stream after layer L's attention, so it also receives from layer L's heads
  (not with `parallel_attn_mlp`, where attention and MLP read the same stream);
- `logits` receive from everything.

Sizes (`Graph.from_model(model).summary()`):

| model | nodes | edges | edges with `qkv_inputs=True` |
|---|---|---|---|
| SmolLM2-135M (30 layers x 9 heads, 30 MLPs) | 302 | 44,371 | 123,211 |
| GPT-2 small (12 layers x 12 heads) | 158 | 11,611 | 32,491 |
| Gemma-3-270M (18 layers x 4 heads) | 92 | 4,078 | 10,342 |
| `tiny-gpt2`, `tiny-llama` (2 layers x 4 heads) | 12 | 54 | 110 |

In general, with `n` layers of `h` heads and an MLP each: `2 + n (h + 1)` nodes and
`h (n + (h + 1) n (n - 1) / 2)` edges into heads (three times that with `qkv_inputs`),
`n (h + 1) + (h + 1) n (n - 1) / 2` into MLPs and `1 + n (h + 1)` into the logits.

**What an edge's intervention is.** Patching edge `s -> r` gives receiver `r` the input
`input_r + (out_s^source - out_s^target)` while everything else, including every other path
from `s`, stays as in the target run (`interp.attribution.edges`). The output of a head is its
`z @ W_O` (the head's share of the attention output; the bias `b_O` is the same in every run).
Models that normalise the attention output (Gemma's `ln1_post`, post-norm architectures) do not
write a sum over heads; there a head's output difference is the change of the layer's
(normalised) attention output when that head alone takes its source value, the others keeping
their target values, so the heads' differences do not add up to the layer's.

Grouped-query attention: an edge into head `h` changes head `h`'s input only. A key/value head
is shared by several query heads, so the edge methods run with the key and value projections
repeated per query head (`ungroup_grouped_query_attention`: the same numbers in an unpatched
run), and `a{L}.h{H}<k>` is head H's own copy of the keys.

`EdgeScores` holds a method's score per edge with query helpers (`top`, `to_frame`, `sel`, a
dense `[senders, receivers]` view, and masks of the top edges for circuit discovery).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple, Sequence, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

__all__ = ["Edge", "EdgeScores", "EdgeSpec", "Graph", "Node", "Receiver"]

NodeKind = Literal["input", "head", "mlp", "logits"]
QKV = ("q", "k", "v")


@dataclass(frozen=True)
class Node:
    """A node of the graph.

    Attributes:
        name: `input`, `a{L}.h{H}`, `m{L}` or `logits`.
        kind: `input`, `head`, `mlp` or `logits`.
        layer: the block it belongs to; -1 for `input`, `n_layers` for `logits`.
        head: the head index of a head, else None.
    """

    name: str
    kind: NodeKind
    layer: int
    head: int | None = None


@dataclass(frozen=True)
class Receiver:
    """One input of a node: a head's input (`qkv` None), or its q, k or v input; an MLP's
    input; the final residual stream (`logits`)."""

    node: Node
    qkv: Literal["q", "k", "v"] | None = None

    @property
    def name(self) -> str:
        return self.node.name if self.qkv is None else f"{self.node.name}<{self.qkv}>"

    def hook_names(self, n_layers: int) -> tuple[str, ...]:
        """The TransformerLens hook points whose activation is this input (heads: with
        `use_split_qkv_input`; MLPs: with `use_hook_mlp_in`)."""
        node = self.node
        if node.kind == "head":
            letters = QKV if self.qkv is None else (self.qkv,)
            return tuple(f"blocks.{node.layer}.hook_{x}_input" for x in letters)
        if node.kind == "mlp":
            return (f"blocks.{node.layer}.hook_mlp_in",)
        return (f"blocks.{n_layers - 1}.hook_resid_post",)


class Edge(NamedTuple):
    """A sender's output reaching a receiver's input through the residual stream."""

    sender: Node
    receiver: Receiver

    @property
    def name(self) -> str:
        return f"{self.sender.name}->{self.receiver.name}"


#: How an edge is named in queries: `"a0.h1->a2.h3<q>"`, a (sender, receiver) pair of names,
#: an `Edge`, or an edge number (its index in `Graph.edges()`).
EdgeSpec = Union[str, tuple[str, str], Edge, int]


class Graph:
    """Nodes and edges of a model (see the module docstring); build it with `from_model`.

    Senders are ordered as they write: `input`, then per layer its heads and its MLP. Receivers
    are ordered as they read: per layer its heads (with `qkv_inputs`: all q inputs, then k, then
    v), its MLP, and `logits` last. Each receiver receives from a prefix of the senders
    (`n_senders_into`). Edges are numbered in the row-major order of `mask` (sender-major):
    edge `i` is `mask.nonzero()[i]`, so `dense[mask]` lists the scores in edge order.

    Attributes:
        n_layers, n_heads: the model's sizes.
        qkv_inputs: whether a head has three receivers (q, k, v) instead of one.
        has_mlp: False for attention-only models.
        parallel_attn_mlp: attention and MLP of a layer read the same residual stream.
        n_key_value_heads: the model's key/value heads (None: as many as query heads).
        attn_out_norm: whether the attention output is normalised before it joins the stream
            (Gemma's `ln1_post`, post-norm architectures).
        model_name: the model's name, for messages.
    """

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        qkv_inputs: bool = False,
        has_mlp: bool = True,
        parallel_attn_mlp: bool = False,
        n_key_value_heads: int | None = None,
        attn_out_norm: bool = False,
        model_name: str = "",
    ) -> None:
        if n_layers < 1 or n_heads < 1:
            raise ValueError(f"a graph needs at least one layer and one head, got {n_layers} layers "
                             f"and {n_heads} heads")
        self.n_layers, self.n_heads, self.qkv_inputs = n_layers, n_heads, qkv_inputs
        self.has_mlp, self.parallel_attn_mlp = has_mlp, parallel_attn_mlp
        self.n_key_value_heads, self.attn_out_norm = n_key_value_heads, attn_out_norm
        self.model_name = model_name

        self.input = Node("input", "input", -1)
        self.logits = Node("logits", "logits", n_layers)
        self.heads = [[Node(f"a{layer}.h{h}", "head", layer, h) for h in range(n_heads)]
                      for layer in range(n_layers)]
        self.mlps = [Node(f"m{layer}", "mlp", layer) for layer in range(n_layers)] if has_mlp else []

        senders: list[Node] = [self.input]
        receivers: list[Receiver] = []
        into: list[int] = []
        per_layer = n_heads + (1 if has_mlp else 0)
        for layer in range(n_layers):
            before = 1 + layer * per_layer  # input and every node of earlier layers
            letters: Sequence[str | None] = QKV if qkv_inputs else (None,)
            for letter in letters:
                for node in self.heads[layer]:
                    receivers.append(Receiver(node, letter))
                    into.append(before)
            senders += self.heads[layer]
            if has_mlp:
                receivers.append(Receiver(self.mlps[layer]))
                into.append(before if parallel_attn_mlp else before + n_heads)
                senders.append(self.mlps[layer])
        receivers.append(Receiver(self.logits))
        into.append(len(senders))

        self.senders: tuple[Node, ...] = tuple(senders)
        self.receivers: tuple[Receiver, ...] = tuple(receivers)
        self.n_senders_into: Int[Tensor, " receivers"] = torch.tensor(into)
        """How many senders (a prefix of `senders`) feed each receiver."""
        self.mask: Bool[Tensor, "senders receivers"] = (
            torch.arange(len(senders))[:, None] < self.n_senders_into[None, :])
        """True where sender s reaches receiver r (an edge)."""
        self.nodes: tuple[Node, ...] = (*senders, self.logits)
        self._sender_index = {n.name: i for i, n in enumerate(senders)}
        self._receiver_index = {r.name: i for i, r in enumerate(receivers)}
        self._node_index = {n.name: n for n in self.nodes}
        ranks = torch.cumsum(self.mask.flatten().long(), 0) - 1
        self._edge_rank = torch.where(self.mask.flatten(), ranks, -1).view(self.mask.shape)
        self._pairs: Int[Tensor, "edges 2"] = self.mask.nonzero()

    @classmethod
    def from_model(cls, model: HookedTransformer, qkv_inputs: bool = False) -> Graph:
        """The graph of `model`: input, every head, every MLP, logits (see the module docstring).

        Args:
            model: a causal HookedTransformer (MHA or grouped-query attention; Gemma-style
                extra norms are fine).
            qkv_inputs: give each head three receivers (its q, k and v inputs) instead of one.
        """
        cfg = model.cfg
        if cfg.attention_dir != "causal":
            raise ValueError(f"edge attribution needs causal attention; {cfg.model_name} has "
                             f"attention_dir={cfg.attention_dir!r}")
        if getattr(cfg, "use_attn_in", False):
            raise ValueError("the model has cfg.use_attn_in set; edge methods read each head's "
                             "inputs through use_split_qkv_input: call model.set_use_attn_in(False)")
        attn_out_norm = bool(cfg.use_normalization_before_and_after) or (
            cfg.original_architecture in POST_NORM_ARCHITECTURES)
        return cls(cfg.n_layers, cfg.n_heads, qkv_inputs=qkv_inputs, has_mlp=not cfg.attn_only,
                   parallel_attn_mlp=bool(cfg.parallel_attn_mlp),
                   n_key_value_heads=cfg.n_key_value_heads, attn_out_norm=attn_out_norm,
                   model_name=str(cfg.model_name))

    # -- sizes --------------------------------------------------------------------------------

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_edges(self) -> int:
        return len(self._pairs)

    @property
    def n_senders(self) -> int:
        return len(self.senders)

    @property
    def n_receivers(self) -> int:
        return len(self.receivers)

    def summary(self) -> str:
        """One line: nodes, senders, receivers and edges."""
        qkv = " (q, k, v inputs apart)" if self.qkv_inputs else ""
        return (f"{self.model_name or 'graph'}: {self.n_layers} layers x {self.n_heads} heads"
                f"{' + MLPs' if self.has_mlp else ''}; {self.n_nodes} nodes, {self.n_senders} "
                f"senders, {self.n_receivers} receivers{qkv}, {self.n_edges:,} edges")

    def __repr__(self) -> str:
        return f"Graph({self.summary()})"

    # -- names ----------------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        """The node called `name`; a ValueError listing the naming scheme otherwise."""
        try:
            return self._node_index[name]
        except KeyError:
            raise ValueError(self._unknown("node", name)) from None

    def sender_index(self, name: str) -> int:
        if name not in self._sender_index:
            extra = " (logits receive, they do not send)" if name == "logits" else ""
            raise ValueError(self._unknown("sender", name) + extra)
        return self._sender_index[name]

    def receiver_indices(self, name: str) -> list[int]:
        """Receivers matching `name`: `a2.h3<q>`; `a2.h3` (its one input, or all of q, k, v
        with `qkv_inputs`); `m1`; `logits`."""
        if name in self._receiver_index:
            return [self._receiver_index[name]]
        if self.qkv_inputs and f"{name}<q>" in self._receiver_index:
            return [self._receiver_index[f"{name}<{x}>"] for x in QKV]
        if name.endswith(">") and not self.qkv_inputs and name.split("<")[0] in self._receiver_index:
            raise ValueError(f"{name!r}: this graph gives each head one input (qkv_inputs=False); "
                             f"name the head {name.split('<')[0]!r}, or build the graph with "
                             "Graph.from_model(model, qkv_inputs=True)")
        extra = " (the input node sends, it does not receive)" if name == "input" else ""
        raise ValueError(self._unknown("receiver", name) + extra)

    def _unknown(self, what: str, name: str) -> str:
        h, n = self.n_heads - 1, self.n_layers - 1
        qkv = ", a{L}.h{H}<q|k|v>" if self.qkv_inputs else ""
        mlp = ", m0..m{n}".format(n=n) if self.has_mlp else ""
        return (f"unknown {what} {name!r} in this graph of {self.n_layers} layers x {self.n_heads} "
                f"heads; nodes are named input, a{{L}}.h{{H}} (L 0..{n}, H 0..{h}){qkv}{mlp}, logits")

    # -- edges ----------------------------------------------------------------------------------

    def edge(self, i: int) -> Edge:
        s, r = self._pairs[i].tolist()
        return Edge(self.senders[s], self.receivers[r])

    def edges(self) -> list[Edge]:
        """Every edge, in edge order."""
        return [Edge(self.senders[s], self.receivers[r]) for s, r in self._pairs.tolist()]

    def edge_names(self, ids: Int[Tensor, " k"] | None = None) -> list[str]:
        pairs = self._pairs if ids is None else self._pairs[ids]
        return [f"{self.senders[s].name}->{self.receivers[r].name}" for s, r in pairs.tolist()]

    def pairs(self, ids: Int[Tensor, " k"] | None = None) -> Int[Tensor, "k 2"]:
        """(sender index, receiver index) of each edge (all edges when `ids` is None)."""
        return self._pairs if ids is None else self._pairs[ids]

    def edge_index(self, spec: EdgeSpec) -> int:
        """The number of one edge; a ValueError naming what is wrong for a pair that is no
        edge (an unknown node, or a sender that writes after the receiver reads)."""
        if isinstance(spec, bool) or not isinstance(spec, (str, tuple, int)):
            raise ValueError(f"an edge is a name 'sender->receiver', a (sender, receiver) pair, an "
                             f"Edge or an edge number; got {type(spec).__name__}")
        if isinstance(spec, int):
            if not 0 <= spec < self.n_edges:
                raise ValueError(f"edge number {spec} is out of range: this graph has "
                                 f"{self.n_edges} edges")
            return spec
        if isinstance(spec, Edge):
            sender, receiver = spec.sender.name, spec.receiver.name
        elif isinstance(spec, tuple):
            if len(spec) != 2:
                raise ValueError(f"an edge pair is (sender, receiver), got {spec!r}")
            sender, receiver = spec
        else:
            if "->" not in spec:
                raise ValueError(f"an edge name is 'sender->receiver' (e.g. 'a0.h1->m2'), got {spec!r}")
            sender, receiver = spec.split("->", 1)
        s = self.sender_index(sender.strip())
        rs = self.receiver_indices(receiver.strip())
        if len(rs) != 1:
            raise ValueError(f"{receiver!r} names the q, k and v inputs of a head; name one "
                             f"edge per input ('{sender}->{receiver}<q>')")
        rank = int(self._edge_rank[s, rs[0]])
        if rank < 0:
            raise ValueError(
                f"there is no edge {sender}->{receiver}: {sender} writes to the residual stream "
                f"after {receiver} reads it (a sender reaches only heads of later layers, the MLP of "
                "its own layer or later ones, and the logits)")
        return rank

    def select(
        self,
        edges: Sequence[EdgeSpec] | None = None,
        sender: str | Sequence[str] | None = None,
        receiver: str | Sequence[str] | None = None,
    ) -> Int[Tensor, " k"]:
        """Edge numbers: those listed in `edges` (in that order), or every edge whose sender
        and receiver match (names or shell patterns, `"a3.*"`, `"m*"`; a head's name matches
        its q, k, v inputs too), in edge order. A ValueError when a name matches nothing."""
        if edges is not None:
            if sender is not None or receiver is not None:
                raise ValueError("give either `edges` or `sender`/`receiver` patterns, not both")
            if isinstance(edges, (str, int, Edge)):
                edges = [edges]
            ids = [self.edge_index(e) for e in edges]
            if len(set(ids)) != len(ids):
                raise ValueError("the edge list names some edge twice")
            return torch.tensor(ids, dtype=torch.long)
        keep_s = self._match([n.name for n in self.senders], sender, "sender")
        names = [r.name for r in self.receivers]
        heads = [r.node.name for r in self.receivers]
        keep_r = self._match(names, receiver, "receiver") | self._match(heads, receiver, "receiver", quiet=True)
        chosen = self.mask & keep_s[:, None] & keep_r[None, :]
        return self._edge_rank[chosen]  # row-major: edge order

    def _match(self, names: list[str], patterns: str | Sequence[str] | None, what: str,
               quiet: bool = False) -> Bool[Tensor, " n"]:
        if patterns is None:
            return torch.ones(len(names), dtype=torch.bool)
        pats = [patterns] if isinstance(patterns, str) else list(patterns)
        keep = torch.zeros(len(names), dtype=torch.bool)
        for pat in pats:
            hit = torch.tensor([fnmatch.fnmatchcase(n, pat) for n in names], dtype=torch.bool)
            if not quiet and not hit.any() and not self._matches_head(pat, what):
                raise ValueError(self._unknown(what, pat))
            keep |= hit
        return keep

    def _matches_head(self, pat: str, what: str) -> bool:
        return what == "receiver" and any(fnmatch.fnmatchcase(r.node.name, pat) for r in self.receivers)

    def check_model(self, model: HookedTransformer) -> None:
        """A ValueError unless this graph was built for a model of `model`'s shape."""
        cfg = model.cfg
        ours = (self.n_layers, self.n_heads, self.has_mlp, self.parallel_attn_mlp)
        theirs = (cfg.n_layers, cfg.n_heads, not cfg.attn_only, bool(cfg.parallel_attn_mlp))
        if ours != theirs:
            raise ValueError(
                f"this graph was built for {self.n_layers} layers x {self.n_heads} heads (MLPs "
                f"{self.has_mlp}, parallel {self.parallel_attn_mlp}) but the model has "
                f"{cfg.n_layers} x {cfg.n_heads} (MLPs {not cfg.attn_only}, parallel "
                f"{bool(cfg.parallel_attn_mlp)}): use Graph.from_model(model)")


@dataclass
class EdgeScores:
    """One method's score per edge, for all edges of a graph or some of them.

    Attributes:
        graph: the `Graph` the edges belong to.
        ids: `[k]` the edge numbers scored (edge order for full results).
        values: `[k]` the estimated or measured change of the metric when the edge is patched
            (patched metric minus the target run's metric, mean over prompts).
        method: `eap`, `eap-ig`, `relp`, `exact`, ...
        baseline: the metric of the unpatched target run (mean over prompts).

    Queries: `top(k)`, `to_frame()`, `sel(sender=..., receiver=...)`, `dense()` (a
    `[senders, receivers]` tensor), `mask(top_n=...)` / `mask(threshold=...)` (the edges a
    circuit keeps), `score(edge)`.
    """

    graph: Graph
    ids: Int[Tensor, " k"]
    values: Float[Tensor, " k"]
    method: str
    baseline: float = 0.0

    def __post_init__(self) -> None:
        if self.ids.shape != self.values.shape:
            raise ValueError(f"EdgeScores needs one value per edge id; got {tuple(self.ids.shape)} "
                             f"ids and {tuple(self.values.shape)} values")

    def __len__(self) -> int:
        return len(self.ids)

    def names(self) -> list[str]:
        """`sender->receiver` per scored edge, in `values` order."""
        return self.graph.edge_names(self.ids)

    def flat(self) -> Float[Tensor, " k"]:
        return self.values.detach().float().cpu()

    def score(self, edge: EdgeSpec) -> float:
        """The score of one edge (a ValueError if it is not among the scored ones)."""
        i = self.graph.edge_index(edge)
        where = (self.ids == i).nonzero()
        if len(where) == 0:
            raise ValueError(f"edge {self.graph.edge_names(torch.tensor([i]))[0]} was not scored "
                             f"here ({len(self)} of {self.graph.n_edges} edges were)")
        return float(self.values[int(where[0])])

    def dense(self, fill: float = 0.0) -> Float[Tensor, "senders receivers"]:
        """Scores as `[senders, receivers]` (`graph.senders` x `graph.receivers`), `fill` where
        there is no edge or the edge was not scored."""
        out = torch.full(self.graph.mask.shape, fill, dtype=torch.float32)
        s, r = self.graph.pairs(self.ids).unbind(-1)
        out[s, r] = self.flat()
        return out

    def _order(self, by: str) -> Tensor:
        keys = {"abs": lambda v: -v.abs(), "max": lambda v: -v, "min": lambda v: v}
        if by not in keys:
            raise ValueError(f"by must be one of {', '.join(map(repr, keys))}, got {by!r}")
        return torch.sort(keys[by](self.flat()), stable=True).indices

    def _rows(self, index: Sequence[int]) -> list[dict[str, int | str | float | None]]:
        pairs = self.graph.pairs(self.ids).tolist()
        values = self.flat().tolist()
        rows = []
        for i in index:
            s, r = pairs[i]
            sender, receiver = self.graph.senders[s], self.graph.receivers[r]
            rows.append({"edge": f"{sender.name}->{receiver.name}", "sender": sender.name,
                         "receiver": receiver.node.name, "qkv": receiver.qkv,
                         "sender_layer": sender.layer, "receiver_layer": receiver.node.layer,
                         "value": values[i]})
        return rows

    def top(self, k: int = 10, by: str = "abs") -> list[dict[str, int | str | float | None]]:
        """The `k` edges with the largest scores, largest first, each a row as in `to_frame`
        (`{"edge": "a0.h1->m2", "sender": "a0.h1", "receiver": "m2", "qkv": None, ...,
        "value": 0.4}`).

        Args:
            k: how many (fewer if there are fewer).
            by: `"abs"` (largest |value|), `"max"` (most positive) or `"min"` (most negative);
                ties keep edge order.
        """
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        return self._rows(self._order(by)[:k].tolist())

    def to_frame(self):
        """A pandas DataFrame, one row per scored edge: `edge`, `sender`, `receiver` (the node),
        `qkv` (q/k/v or None), `sender_layer`, `receiver_layer` (-1 input, n_layers logits),
        `value`."""
        import pandas as pd

        return pd.DataFrame(self._rows(range(len(self))),
                            columns=["edge", "sender", "receiver", "qkv", "sender_layer",
                                     "receiver_layer", "value"])

    def sel(
        self,
        sender: str | Sequence[str] | None = None,
        receiver: str | Sequence[str] | None = None,
    ) -> EdgeScores:
        """The scored edges whose sender and receiver match (names or shell patterns such as
        `"a3.*"`; a head's name covers its q, k, v inputs), as a smaller `EdgeScores`."""
        wanted = self.graph.select(sender=sender, receiver=receiver)
        keep = torch.isin(self.ids, wanted)
        return replace(self, ids=self.ids[keep], values=self.values[keep])

    def mask(
        self, top_n: int | None = None, threshold: float | None = None, absolute: bool = True
    ) -> Bool[Tensor, "senders receivers"]:
        """The edges a circuit keeps, as a `[senders, receivers]` boolean mask: the `top_n`
        largest scores, or those at least `threshold` (by |value| when `absolute`). Unscored
        edges and non-edges are False."""
        if (top_n is None) == (threshold is None):
            raise ValueError("give exactly one of top_n and threshold")
        values = self.flat().abs() if absolute else self.flat()
        if top_n is not None:
            if not 0 <= top_n <= len(self):
                raise ValueError(f"top_n must be in [0, {len(self)}] (the scored edges), got {top_n}")
            keep = torch.zeros(len(self), dtype=torch.bool)
            keep[torch.sort(-values, stable=True).indices[:top_n]] = True
        else:
            keep = values >= threshold
        out = torch.zeros(self.graph.mask.shape, dtype=torch.bool)
        s, r = self.graph.pairs(self.ids[keep]).unbind(-1)
        out[s, r] = True
        return out

    def sender_totals(self) -> Float[Tensor, " senders"]:
        """The sum of the scores of each sender's scored edges (0 for senders without any)."""
        return self.dense().sum(1)
