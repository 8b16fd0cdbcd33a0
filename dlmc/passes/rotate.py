"""rotate: QuaRot's rotation of the residual stream (Ashkboos et al., 2024), folded into the weights.

With Q an orthonormal Hadamard matrix [d, d] (d = hidden size), every value of the residual stream
is replaced by its rotation h Q, at no run-time cost:

  1. each RMSNorm's scale g moves into the linears that read the norm (W <- W diag(g), g <- 1; the
     final norm's into the output head), so that what remains of the norm, h / rms(h), commutes with
     Q: the mean square of a row is rotation invariant;
  2. the embedding table E <- E Q, so the stream starts rotated;
  3. every linear that reads the stream W <- W Q (q/k/v, gate/up, the head), so its output is unchanged;
  4. every linear that writes into it W <- Q^T W, b <- Q^T b (o_proj, down_proj), so what it adds is
     rotated too.

The network computes the same function, but the activations q/k/v, gate/up and the head read are now
rotated: an outlier channel's energy is spread over all d channels, so per-token int8 activations
lose far less, without the online [d, d] matmul `quantize`'s `outliers: hadamard` adds per linear.
The MLP intermediate (down_proj's input) is not part of the stream; it still needs that online
rotation. Run it before `quantize`.

The pieces are found in the graph, not by name: starting at the embedding, the pass follows every
value derived from the stream and accepts only operations that commute with Q (casts, per-token
scalings, residual adds, the norm's mean of squares, the norm scale it folds, the reading linears).
Anything else refuses the whole rotation, so a step that is rotated is rotated exactly.

Exactness: the rotated step equals the original in exact arithmetic, not bit for bit (a float32 step
moves by ~1e-6 relative; a bf16 checkpoint's weights are rounded again after rotation). The pass is
therefore declared approximate; its oracle is the original step within float tolerance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from dlmc.capture import StepProgram
from dlmc.errors import DlmcError
from dlmc.passes import PassConfig, PassResult, copy_graph, input_kinds, rebuild, register
from dlmc.quant.hadamard import hadamard

log = logging.getLogger(__name__)

aten = torch.ops.aten
LINEAR = aten.linear.default
EMBEDDING = aten.embedding.default
MUL = aten.mul.Tensor
ADD = aten.add.Tensor
SQUARE = aten.pow.Tensor_Scalar
MEAN = aten.mean.dim
CASTS = {aten.to.dtype, aten._to_copy.default, aten.alias.default, aten.clone.default}
ASSERT = aten._assert_tensor_metadata.default
ROTATED = "dlmc_rotation"
"""Node meta key marking an embedding whose table is already rotated (a second run changes nothing)."""
HEAD = "lm_head.weight"
"""The key a tied output head gets once it stops sharing the embedding table."""


@dataclass(frozen=True, kw_only=True)
class Rotate(PassConfig):
    """Rotate the residual stream by an orthonormal Hadamard matrix, folded into the weights."""

    name: ClassVar[str] = "rotate"
    exact: ClassVar[bool] = False


@dataclass
class Plan:
    """What the rotation changes, by state key."""

    embedding: str
    readers: dict[str, str | None]
    """Weight of a linear that reads the stream -> the norm scale folded into it (None: no norm)."""
    writers: dict[str, str | None]
    """Weight of a linear that writes into the stream -> its bias (None: no bias)."""
    norms: list[str]
    """The folded norm scales, set to 1."""
    tied: list[torch.fx.Node]
    """Reading linears whose weight is the embedding table: they get their own parameter."""


@register(Rotate)
def rotate(program: StepProgram, config: Rotate) -> PassResult:
    gm = copy_graph(program)
    if any(node.meta.get(ROTATED) for node in gm.graph.nodes):
        return PassResult(program, False)
    kinds = input_kinds(program)
    state = dict(program.exported.state_dict)
    plan, embedding = _plan(gm, kinds, state)
    d = state[plan.embedding].shape[1]
    q = hadamard(d).double()  # [d, d]

    new_inputs = {}
    if plan.tied:  # the head keeps the unrotated table (and the final norm's scale); the embedding must not
        if HEAD in state:
            raise DlmcError(f"rotate: the output head reads {plan.embedding} but {HEAD} exists already")
        table = embedding.args[0]
        with gm.graph.inserting_after(table):  # parameters stay together, ahead of the buffers
            head = gm.graph.placeholder(HEAD.replace(".", "_"))
        head.meta["val"] = table.meta["val"]
        for linear in plan.tied:
            linear.replace_input_with(table, head)
        state[HEAD] = state[plan.embedding]
        plan.readers[HEAD] = plan.readers.pop(plan.embedding)
        new_inputs[head.name] = InputSpec(kind=InputKind.PARAMETER, arg=TensorArgument(name=head.name), target=HEAD)

    def update(key: str, value: torch.Tensor) -> None:
        old = state[key]
        value = value.to(old.dtype)
        state[key] = torch.nn.Parameter(value, requires_grad=False) if isinstance(old, torch.nn.Parameter) else value

    def in_float64(key: str) -> torch.Tensor:  # rotations are computed in float64, rounded once
        return state[key].detach().double()

    for key, norm in plan.readers.items():
        w = in_float64(key)  # [out, d]
        if norm is not None:
            w = w * in_float64(norm)  # W diag(g)
        update(key, w @ q.to(w.device))
    for key, bias in plan.writers.items():
        update(key, q.to(state[key].device).T @ in_float64(key))  # [d, in]
        if bias is not None:
            update(bias, q.to(state[bias].device).T @ in_float64(bias))  # [d]
    for key in plan.norms:
        update(key, torch.ones_like(state[key]))
    update(plan.embedding, in_float64(plan.embedding) @ q.to(state[plan.embedding].device))  # [V, d]
    embedding.meta[ROTATED] = f"hadamard {d}"

    gm.graph.lint()
    gm.recompile()
    log.debug("rotate: %d reading and %d writing linears, %d norms folded", len(plan.readers), len(plan.writers),
              len(plan.norms))
    return PassResult(rebuild(program, gm, state_dict=state, new_inputs=new_inputs), True)


# ---------------------------------------------------------------------------------------------
# following the residual stream through the graph
# ---------------------------------------------------------------------------------------------


def _plan(
    gm: torch.fx.GraphModule, kinds: dict[str, tuple[str, str | None]], state: dict[str, torch.Tensor]
) -> tuple[Plan, torch.fx.Node]:
    if any(getattr(node.target, "namespace", None) == "dlmc" for node in gm.graph.nodes):
        raise DlmcError("rotate: the step has quantized linears already; put rotate before quantize")

    def parameter(node: object) -> str | None:
        if not isinstance(node, torch.fx.Node) or node.op != "placeholder":
            return None
        kind, key = kinds.get(node.name, (None, None))
        return key if kind == "PARAMETER" else None

    embeddings = [n for n in gm.graph.nodes if n.target is EMBEDDING and parameter(n.args[0])]
    if len(embeddings) != 1:
        raise DlmcError(f"rotate: expected one embedding lookup in the step, found {len(embeddings)}")
    (embedding,) = embeddings
    table = parameter(embedding.args[0])
    d = state[table].shape[1]

    stream = {embedding}  # values in the rotated basis: h Q instead of h
    squares: set[torch.fx.Node] = set()  # h * h, only ever averaged over the hidden dimension
    scaled: dict[torch.fx.Node, str] = {}  # g * h / rms(h): a norm's output, -> the scale g it folds away
    plan = Plan(embedding=table, readers={}, writers={}, norms=[], tied=[])

    def refuse(node: torch.fx.Node, why: str) -> DlmcError:
        where = _module_of(node)
        return DlmcError(f"rotate: cannot rotate the residual stream through {node.name} "
                         f"({node.target}{', in ' + where if where else ''}): {why}")

    def read_by(node: torch.fx.Node, linear: torch.fx.Node, norm: str | None) -> None:
        key = parameter(linear.args[1])
        if linear.args[0] is not node or key is None or len(linear.args) > 3 or linear.kwargs:
            raise refuse(linear, "a linear reading the stream must have a weight parameter")
        if key in plan.readers and plan.readers[key] != norm:
            raise refuse(linear, f"{key} reads the stream under two different norms")
        plan.readers[key] = norm
        if key == table:
            plan.tied.append(linear)

    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if node.op == "output":
            if set(inputs) & (stream | squares | set(scaled)):
                raise refuse(node, "the step returns a residual-stream value")
            continue
        if node in stream or not set(inputs) & (stream | squares | set(scaled)):
            continue
        target, args = node.target, node.args
        if node.target is ASSERT:  # checks dtype and shape, which the rotation keeps
            continue
        if set(inputs) & set(scaled):  # a norm's scaled output: only casts and linears may read it
            (source,) = inputs if len(inputs) == 1 else (None,)
            if target in CASTS and source is not None:
                scaled[node] = scaled[source]
            elif target is LINEAR and args[0] in scaled:
                read_by(args[0], node, scaled[args[0]])
            else:
                raise refuse(node, "a norm's scale can be folded only into the linears that read it")
            continue
        if set(inputs) & squares:
            if not _row_mean(node):
                raise refuse(node, "a square of the stream must be averaged over the hidden dimension")
            continue  # the mean square of a row: the same in any orthonormal basis
        if target in CASTS and len(inputs) == 1:
            stream.add(node)
        elif target is SQUARE and args[1] == 2:
            squares.add(node)
        elif target is MUL and len(args) == 2:
            other = args[1] if args[0] in stream else args[0]
            if other in stream:
                raise refuse(node, "a product of two stream values")
            norm = parameter(other)
            if norm is not None and tuple(state[norm].shape) == (d,):
                if len(other.users) != 1:
                    raise refuse(node, f"the norm scale {norm} is also read elsewhere")
                scaled[node] = norm
                plan.norms.append(norm)
            elif _per_token(other):
                stream.add(node)
            else:
                raise refuse(node, "only a per-token factor (a number, or one value per row) commutes with it")
        elif target is ADD and len(args) == 2 and not node.kwargs:
            if args[0] in stream and args[1] in stream:
                stream.add(node)
            else:
                other = args[1] if args[0] in stream else args[0]
                writer = _writer(other)
                key = parameter(writer.args[1]) if writer is not None else None
                if key is None or state[key].shape[0] != d:
                    raise refuse(node, "the stream may only be added to another stream value or a linear's output")
                if key in plan.writers or key in plan.readers:
                    raise refuse(node, f"{key} writes into the stream twice, or also reads it")
                bias = writer.args[2] if len(writer.args) > 2 else None
                if bias is not None and parameter(bias) is None:
                    raise refuse(writer, "its bias is not a parameter")
                plan.writers[key] = parameter(bias)
                stream.add(node)
        elif target is LINEAR:
            read_by(node, node, None)
        elif target is EMBEDDING:
            raise refuse(node, "the embedding table is read twice")
        else:
            raise refuse(node, "this operation does not commute with a rotation")
        if node in stream and node.meta["val"].shape[-1] != d:
            raise refuse(node, f"its last dimension is not the hidden size {d}")

    for key in plan.readers:  # a reading weight used any other way would see the rotation too
        placeholder = next(n for n in gm.graph.find_nodes(op="placeholder") if parameter(n) == key)
        for user in placeholder.users:
            reads_stream = user.target is LINEAR and (user.args[0] in stream or user.args[0] in scaled)
            if not reads_stream and not (key == table and user is embedding):
                raise refuse(user, f"{key} is read by the stream's linears and by this")
    for key in plan.writers:
        placeholder = next(n for n in gm.graph.find_nodes(op="placeholder") if parameter(n) == key)
        if len(placeholder.users) != 1:
            raise refuse(placeholder, f"{key} writes into the stream and is read elsewhere too")
    if not plan.writers:
        raise DlmcError("rotate: no linear writes into the residual stream; nothing to rotate")
    return plan, embedding


def _row_mean(node: torch.fx.Node) -> bool:
    """mean(x, dim=[-1], keepdim=True): one value per row."""
    if node.target is not MEAN:
        return False
    dims, ndim = list(node.args[1]), node.args[0].meta["val"].dim()
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return dims in ([-1], [ndim - 1]) and keepdim


def _writer(node: torch.fx.Node) -> torch.fx.Node | None:
    """The linear whose output, through casts only and read nowhere else, is `node`."""
    while node.target in CASTS and len(node.users) == 1:
        node = node.args[0]
    if node.target is LINEAR and len(node.users) == 1 and not node.kwargs:
        return node
    return None


def _per_token(value: object) -> bool:
    """A number, or a tensor with one value per row (size 1 in the hidden dimension)."""
    if isinstance(value, (int, float)):
        return True
    val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and (val.dim() == 0 or val.shape[-1] == 1)


def _module_of(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""
