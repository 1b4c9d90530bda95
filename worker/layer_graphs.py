"""The decoder layers' forward and backward passes replayed as CUDA graphs: the host's Python and
launches paid once, at capture, instead of at every step.

The training step is bound by the host: per decoder layer some ten milliseconds of Python and
kernel launches (transformers' layer, Liger's launchers, our fused functions), whatever the
layer's size, so a Llama-3.2-3B layer, whose GPU work is a few milliseconds, waits on the host
most of its step (bench/RESULTS.md, sessions 4, 9 and 11). A CUDA graph records a layer's kernels
once and launches them all with one call.

    graphs = graph_layers(layers)   # the model's decoder layers, in order
    ...                             # training passes: recorded, captured, then replayed
    ungraph_layers(layers)

How it goes. A training pass (gradients on, the model in training mode) whose inputs have a new
signature (shapes, dtypes, the scalars such as the longest sequence, which layers checkpoint)
runs as before and records each layer's inputs. The next pass with the same signature captures
every layer's forward graph, first to last, then its backward graph, last to first, into one
memory pool, the order in which they replay, so a block one graph frees another reuses as the
eager step would. Each layer's input buffer is the previous layer's output buffer and each
layer's output gradient the next layer's input gradient: nothing is copied between layers. From
then on, each layer is one autograd function: its forward replays the forward graph, its
backward replays the backward graph and adds the LoRA gradients into `.grad`.

A checkpointed layer checkpoints inside its graphs, non-reentrant (the capture's
`torch.autograd.grad` cannot run the reentrant kind; its Python hooks run at capture only), with
no RNG state kept: the layers this serves draw no random numbers (plain LoRA, no dropout).

Where a graph cannot serve, the layer runs as before: no CUDA, no gradients (evaluation,
generation), an input that is not a tensor or a plain value, a signature beyond the few kept
(`MAX_SIGNATURES`; variable-length batches keep the eager path), a layer whose graph is still
waiting for its backward pass (a second forward pass first), or a capture that failed (said once
in the log; `failure` keeps why).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
import traceback
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from worker import lora_projection

log = logging.getLogger(__name__)

ENABLED = True  # the recipe's switch (bench/profile_step.py turns graphs on and off itself)
EMULATE = False  # tests: the recipe's layers replayed by the stand-in on the CPU
MAX_SIGNATURES = 1  # input signatures with graphs per model: each holds its memory pool
WARMUP_PASSES = 2  # eager passes on the side stream before a capture (autotuning, workspaces)
_ATTR = "_tuneboard_layer_graphs"


def graph_layers(layers: list[Any], emulate: bool | None = None) -> LayerGraphs | None:
    """Replay `layers` as CUDA graphs from their second training pass with the same inputs.
    None where there is nothing to do (no layers, no CUDA and no `emulate`). `emulate` stands a
    Python replay in for the CUDA graph, for tests on the CPU."""
    emulate = EMULATE if emulate is None else emulate
    if not layers or not (emulate or _on_cuda(layers[0])):
        return None
    ungraph_layers(layers)
    graphs = LayerGraphs(layers, emulate)
    for index, layer in enumerate(layers):
        vars(layer)[_ATTR] = (graphs, index)
        layer.__class__ = _graphed_class(type(layer))
    return graphs


def ungraph_layers(layers: list[Any]) -> None:
    for layer in layers:
        entry = vars(layer).pop(_ATTR, None)
        if entry is not None:
            entry[0].release()
        if getattr(type(layer), "_tuneboard_graphed", False):
            layer.__class__ = type(layer).__bases__[0]


def graphs_of(layers: list[Any]) -> LayerGraphs | None:
    entry = vars(layers[0]).get(_ATTR) if layers else None
    return entry[0] if entry else None


def _on_cuda(layer: Any) -> bool:
    return any(p.is_cuda for p in layer.parameters())


_GRAPHED: dict[type, type] = {}


def _graphed_class(cls: type) -> type:
    """`cls` with a `__call__` that asks the layer's graphs first (a subclass: Python looks up
    `__call__` on the type; transformers' checkpointing lives in `__call__` or `forward`,
    depending on its version, and both stay as they were for the eager path)."""

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        entry = vars(self).get(_ATTR)
        if entry is not None:
            out = entry[0].call(entry[1], self, args, kwargs)
            if out is not None:
                return out
        return cls.__call__(self, *args, **kwargs)

    if cls in _GRAPHED:
        return _GRAPHED[cls]
    graphed = _GRAPHED[cls] = type(
        cls.__name__,
        (cls,),
        {
            "__call__": __call__,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "_tuneboard_graphed": True,
        },
    )
    return graphed


# --- a call's signature ------------------------------------------------------------------------

_PLAIN = (torch.Tensor, type(None), bool, int, float, str, torch.dtype)
# Reach the layers in their keyword arguments, read by the loss only: a graph neither takes nor
# keys on them (the Trainer's token count would make its passes differ from a trial step's).
_LOSS_ONLY = frozenset({"num_items_in_batch"})


def _flatten(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], Any] | None:
    """The call's values in order, and its structure; None when a value is neither a tensor nor
    a plain value (nor a tuple or list of them), e.g. a KV cache."""
    leaves: list[Any] = []
    structure: list[Any] = []
    for name, value in [*((None, a) for a in args), *sorted(kwargs.items())]:
        if isinstance(value, tuple | list):
            if not all(isinstance(v, _PLAIN) for v in value):
                return None
            structure.append((name, type(value), len(value)))
            leaves += value
        elif isinstance(value, _PLAIN):
            structure.append((name, None, 1))
            leaves.append(value)
        else:
            return None
    return leaves, tuple(structure)


def _unflatten(leaves: list[Any], structure: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    position = 0
    for name, kind, count in structure:
        value = leaves[position] if kind is None else kind(leaves[position : position + count])
        position += count
        if name is None:
            args.append(value)
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def _signature(layer: Any, leaves: list[Any], structure: Any) -> Any:
    parts: list[Any] = [structure, bool(layer.gradient_checkpointing)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.device, leaf.requires_grad))
        else:
            parts.append(leaf)
    device = leaves[0].device.type  # the hidden states'
    parts.append((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))
    return tuple(parts)


# --- the graphs ----------------------------------------------------------------------------------


class _Record:
    """One layer's call in a recorded pass: its signature and inputs (tensors other than the
    hidden states are cloned once per pass and shared between layers, as the live ones were)."""

    def __init__(
        self, layer: Any, signature: Any, leaves: list[Any], structure: Any, wants_grad: bool
    ) -> None:
        self.layer = layer
        self.signature = signature
        self.leaves = leaves
        self.structure = structure
        self.wants_grad = wants_grad  # whether the hidden states it gets want a gradient
        self.checkpointed = bool(layer.gradient_checkpointing)
        self.params = [p for p in layer.parameters() if p.requires_grad]
        # The class's own forward, without transformers' checkpointing wrapper (>= 5.20).
        self.forward = inspect.unwrap(type(layer).forward)

    def run(self, hidden: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The layer's forward pass on `hidden` and the recorded other inputs, checkpointed
        non-reentrant where the layer checkpoints, and the LoRA weights' aliases it read: the
        backward pass takes their gradients (`weights`, for a checkpointed layer's recompute)."""
        aliases = [p.view_as(p) for p in self.params]
        args, kwargs = _unflatten([hidden, *self.leaves[1:]], self.structure)
        forward = functools.partial(self.forward, self.layer)
        with self.weights(aliases):
            if not self.checkpointed:
                return forward(*args, **kwargs), aliases
            from torch.utils.checkpoint import checkpoint

            out = checkpoint(
                forward,
                *args,
                use_reentrant=False,
                preserve_rng_state=False,
                determinism_check="none",
                **kwargs,
            )
        return out, aliases

    def weights(self, aliases: list[torch.Tensor]) -> Any:
        """The fused functions read the LoRA weights as `aliases`: made inside the capture, so
        the capture's backward pass ends at them and never reaches a weight's own gradient node,
        which an earlier eager step may have made on the default stream (the capture then fails:
        "operation would make the legacy stream depend on a capturing blocking stream")."""
        return lora_projection.weights_as(
            {id(p): alias for p, alias in zip(self.params, aliases, strict=True)}
        )


class _Graph:
    """A CUDA graph, or (emulated, on the CPU) the Python it would have recorded, rerun."""

    def __init__(self, emulate: bool) -> None:
        self.emulate = emulate
        self.cuda: Any = None if emulate else torch.cuda.CUDAGraph()
        self.rerun: Any = None

    def capture(self, fn: Any, pool: Any, stream: Any) -> Any:
        if self.emulate:
            self.rerun = fn
            return fn()
        with torch.cuda.graph(
            self.cuda, pool=pool, stream=stream, capture_error_mode="thread_local"
        ):
            return fn()

    def replay(self) -> None:
        if self.emulate:
            with torch.enable_grad():  # an autograd function's forward and backward run without
                self.rerun(replay=True)
        else:
            self.cuda.replay()


class _LayerGraph:
    """One layer's forward and backward graphs and their static tensors."""

    def __init__(self, record: _Record, hidden: torch.Tensor, emulate: bool) -> None:
        self.record = record
        self.signature = record.signature
        self.input = hidden  # static: the previous layer's output buffer (layer 0: its own)
        self.others = record.leaves[1:]  # static: the other inputs, shared between layers
        self.params = record.params
        self.forward_graph = _Graph(emulate)
        self.backward_graph = _Graph(emulate)
        self.output: torch.Tensor | None = None
        self.live_output: Any = None  # emulated: the rerun's, for its backward
        self.live_aliases: list[torch.Tensor] = []  # the LoRA weights' aliases it read
        self.grad_output: torch.Tensor | None = None
        self.grad_input: torch.Tensor | None = None
        self.param_grads: list[torch.Tensor | None] = []
        self.pending: Any = None  # weak reference to the backward node of an unfinished pass

    def capture_forward(self, pool: Any, stream: Any) -> torch.Tensor:
        def forward(replay: bool = False) -> torch.Tensor:
            out, self.live_aliases = self.record.run(self.input)
            if replay:  # emulated: the rerun's values into the captured output
                self.live_output = out
                assert self.output is not None
                self.output.detach().copy_(out)
            return out

        out = self.forward_graph.capture(forward, pool, stream)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"a decoder layer returned {type(out).__name__}, not a tensor")
        self.output = self.live_output = out
        return out

    def capture_backward(self, grad_output: torch.Tensor, pool: Any, stream: Any) -> None:
        wants_input = self.input.requires_grad
        self.grad_output = grad_output

        def backward(replay: bool = False) -> Any:
            inputs = ([self.input] if wants_input else []) + self.live_aliases
            with self.record.weights(self.live_aliases):
                grads = torch.autograd.grad(
                    self.live_output, inputs, grad_outputs=grad_output, allow_unused=True
                )
            if replay:
                for static, grad in zip(self._statics(), grads, strict=True):
                    if static is not None and grad is not None:
                        static.copy_(grad)
            return grads

        grads = self.backward_graph.capture(backward, pool, stream)
        self.grad_input = grads[0] if wants_input else None
        self.param_grads = list(grads[1:] if wants_input else grads)
        self.live_output = None
        self.live_aliases = []

    def _statics(self) -> list[torch.Tensor | None]:
        return ([self.grad_input] if self.input.requires_grad else []) + self.param_grads

    def idle(self) -> bool:
        return self.pending is None or self.pending() is None

    def replay(self, hidden: torch.Tensor, others: list[Any], copied: set[int]) -> torch.Tensor:
        """`copied`: the shared inputs this pass has copied in already (one copy a pass)."""
        for static, live in zip(self.others, others, strict=True):
            if isinstance(static, torch.Tensor) and id(static) not in copied:
                copied.add(id(static))
                if static.data_ptr() != live.data_ptr():
                    static.copy_(live)
        return _Replay.apply(self, hidden, *self.params)


class _Replay(torch.autograd.Function):
    """One graphed layer in the autograd graph. The LoRA weights are inputs so that the output
    wants a gradient even when the hidden states do not; their gradients go into `.grad` here."""

    @staticmethod
    def forward(ctx: Any, graph: _LayerGraph, hidden: torch.Tensor, *params: torch.Tensor):  # type: ignore[override]
        if hidden.data_ptr() != graph.input.data_ptr():
            graph.input.detach().copy_(hidden)
        graph.forward_graph.replay()
        ctx.graph = graph
        graph.pending = weakref.ref(ctx)
        assert graph.output is not None
        return graph.output.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        graph: _LayerGraph = ctx.graph
        assert graph.grad_output is not None
        if grad.data_ptr() != graph.grad_output.data_ptr():
            graph.grad_output.copy_(grad)
        graph.backward_graph.replay()
        graph.pending = None
        _add_into_grad(graph.params, graph.param_grads)
        grad_input = graph.grad_input.detach() if graph.grad_input is not None else None
        return (None, grad_input, *[None] * len(graph.params))


def _add_into_grad(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """`p.grad += g` for each pair, `p.grad = copy of g` where there is none yet (the replay's
    buffers are overwritten by the next replay: `.grad` must not be one of them)."""
    add_to, added, fresh, copied = [], [], [], []
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        if p.grad is None:
            p.grad = torch.empty_like(g)
            fresh.append(p.grad)
            copied.append(g)
        else:
            add_to.append(p.grad)
            added.append(g)
    if add_to:
        torch._foreach_add_(add_to, added)
    if fresh:
        torch._foreach_copy_(fresh, copied)


def _end_rng_capture() -> None:
    """A capture that fails in its end leaves CUDA's default generator marked as capturing, and
    every later random draw on the card fails ("Offset increment outside graph capture"). One
    small capture that succeeds begins and ends the generator's capture again."""
    try:
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        scratch = torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            scratch.add_(1)
        torch.cuda.synchronize()
    except Exception:  # nothing more to do; the eager path does not draw random numbers
        log.warning("CUDA's random number generator may stay unusable", exc_info=True)


class LayerGraphs:
    """Every decoder layer's graphs, per input signature, and what a pass is doing."""

    def __init__(self, layers: list[Any], emulate: bool) -> None:
        self.layers = layers
        self.emulate = emulate
        self.enabled = True  # off after a failed capture
        self.failure: str | None = None
        self.captured: dict[Any, list[_LayerGraph]] = {}
        self.recorded: dict[Any, list[_Record]] = {}
        self.replaying: list[_LayerGraph] | None = None
        self.recording: list[_Record] | None = None
        self.clones: dict[int, torch.Tensor] = {}
        self.copied: set[int] = set()
        self.replays = 0  # layer replays so far (tests, the benchmark)
        self.on_capture: Any = None  # called with (seconds, None) or (None, failure): the recipe

    def call(self, index: int, layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The layer's output from its graph, or None: the layer runs as before."""
        if not (self.enabled and layer.training and torch.is_grad_enabled()):
            return None
        kwargs = {key: value for key, value in kwargs.items() if key not in _LOSS_ONLY}
        flat = _flatten(args, kwargs)
        if flat is None or not args or not isinstance(args[0], torch.Tensor):
            return None
        leaves, structure = flat
        signature = _signature(layer, leaves, structure)
        if index == 0:
            self._begin_pass(signature)
        if self.replaying is not None:
            graph = self.replaying[index]
            if graph.signature == signature and graph.idle():
                self.replays += 1
                return graph.replay(args[0], leaves[1:], self.copied)
            return None
        if self.recording is not None and len(self.recording) == index:
            hidden = args[0]
            record = _Record(
                layer, signature, self._clone(leaves, index), structure, hidden.requires_grad
            )
            self.recording.append(record)
        return None

    def _begin_pass(self, signature: Any) -> None:
        self.replaying = self.recording = None
        self.clones, self.copied = {}, set()
        graphs = self.captured.get(signature)
        if graphs is not None:
            if all(g.idle() for g in graphs):
                self.replaying = graphs
            return
        records = self.recorded.pop(signature, None)
        if records is not None and len(records) == len(self.layers):
            self._capture_all(signature, records)
            return
        if len(self.captured) < MAX_SIGNATURES:
            self.recorded = {signature: []}  # one pass recorded at a time
            self.recording = self.recorded[signature]

    def _clone(self, leaves: list[Any], index: int) -> list[Any]:
        """The first layer's hidden states (the others' are the previous layer's output), and
        every other tensor once per pass (layers share them, as the rotary tables)."""
        out: list[Any] = []
        for position, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor):
                out.append(leaf)
            elif position == 0:
                out.append(leaf.detach().clone() if index == 0 else None)
            else:
                if id(leaf) not in self.clones:
                    self.clones[id(leaf)] = leaf.detach().clone()
                out.append(self.clones[id(leaf)])
        return out

    def _capture_all(self, signature: Any, records: list[_Record]) -> None:
        start = time.perf_counter()
        try:
            graphs = self._capture(records)
        except Exception as error:  # the layers keep their eager path
            self.failure = f"{type(error).__name__}: {error}"
            self.enabled = False
            # The traceback as text: a log record that kept its frames (pytest's, a handler's)
            # would keep the half-captured graphs and their memory pool on the card.
            log.warning(
                "CUDA graphs of the decoder layers are off: %s\n%s",
                self.failure,
                traceback.format_exc(),
            )
            if not self.emulate:
                _end_rng_capture()
            if self.on_capture is not None:
                self.on_capture(None, self.failure)
            return
        self.captured[signature] = graphs
        self.replaying = graphs
        if self.on_capture is not None:  # the capture's seconds, warm-up included
            self.on_capture(time.perf_counter() - start, None)

    def _capture(self, records: list[_Record]) -> list[_LayerGraph]:
        emulate = self.emulate
        stream = None if emulate else torch.cuda.Stream()
        pool = None if emulate else torch.cuda.graph_pool_handle()
        if stream is not None:
            torch.cuda.synchronize()
            # The cached blocks of the last eager pass go back to the card: the side stream's
            # warm-up cannot reuse them, and a card the memory policy filled has no room twice.
            torch.cuda.empty_cache()
            stream.wait_stream(torch.cuda.current_stream())
        with self._capturing(stream):
            for _ in range(0 if emulate else WARMUP_PASSES):
                self._warm_up(records)
            graphs: list[_LayerGraph] = []
            hidden = records[0].leaves[0]
            for record in records:
                hidden = hidden.detach().requires_grad_(record.wants_grad)
                graph = _LayerGraph(record, hidden, emulate)
                hidden = graph.capture_forward(pool, stream)
                graphs.append(graph)
            assert graphs[-1].output is not None
            grad_output = torch.empty_like(graphs[-1].output)
            for graph in reversed(graphs):
                graph.capture_backward(grad_output, pool, stream)
                if graph.grad_input is None:  # the layer before wants none: hand it a buffer
                    grad_output = torch.empty_like(graph.input)
                else:
                    grad_output = graph.grad_input
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
        return graphs

    @contextlib.contextmanager
    def _capturing(self, stream: Any) -> Iterator[None]:
        """On the side stream, the autocast of the pass without its cache (a cached cast made in
        a capture would be freed when autocast exits, and the graph would read freed memory),
        and each LoRA weight cast inside each graph (`casts_kept`'s copies outlive no pass)."""
        device = "cuda" if stream is not None else "cpu"
        autocast = torch.autocast(
            device,
            torch.get_autocast_dtype(device),
            enabled=torch.is_autocast_enabled(device),
            cache_enabled=False,
        )
        on_stream = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with on_stream, autocast, lora_projection.casts_paused():
            yield

    def _warm_up(self, records: list[_Record]) -> None:
        """One eager pass of the chain, forward and backward, on the side stream."""
        first = records[0].leaves[0].detach().requires_grad_(records[0].wants_grad)
        hidden, read = first, []
        for record in records:
            hidden, aliases = record.run(hidden)
            read.append((record, aliases))
        with contextlib.ExitStack() as stack:
            stand_ins: list[torch.Tensor] = []
            for record, aliases in read:
                stack.enter_context(record.weights(aliases))  # for checkpointed recomputes
                stand_ins += aliases
            inputs = ([first] if first.requires_grad else []) + stand_ins
            torch.autograd.grad(hidden, inputs, torch.ones_like(hidden), allow_unused=True)

    def release(self) -> None:
        """Drop every graph and its memory pool."""
        self.captured.clear()
        self.recorded.clear()
        self.replaying = self.recording = None
        self.clones = {}
