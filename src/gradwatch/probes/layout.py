"""Layers that take dimension 0 of their input for the sequence, given batches whose dimension 0 is the batch.

``nn.MultiheadAttention`` (and the ``nn.TransformerEncoderLayer``/``DecoderLayer`` around it) and ``nn.RNN``/
``nn.LSTM``/``nn.GRU`` read (seq, batch, feature) unless built with ``batch_first=True``. Given a (batch, seq,
feature) tensor, such a layer raises nothing: it attends, or recurs, across the samples of the batch at each
position, so the tokens of one sequence never meet, and every sample's output depends on the others in its batch.

A layer's input is read as misread where it is 3-D, its dimension 0 is the size of the model's output's dimension 0
(a classifier's or a regression's per-sample output, 1-D or 2-D) and its dimension 1 is not: laid out as the layer
expects, dimension 1 would be that batch. A model whose output is itself a sequence (3-D) is not judged: its
dimension 0 may be the sequence as well.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

SEQ_FIRST_TYPES = (nn.MultiheadAttention, nn.RNNBase)


def seq_first(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's attention and recurrent layers that read (seq, batch, feature): ``batch_first`` False."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, SEQ_FIRST_TYPES) and not getattr(m, "batch_first", True)]


def misread(shapes: dict[str, list[int]], output: list[int]) -> list[str]:
    """The layers (by name, from their first input's ``shapes``) whose dimension 0 is the batch of a model whose
    ``output`` has the shape given, by the rule of the module's docstring."""
    if not 1 <= len(output) <= 2 or output[0] < 2:
        return []
    batch = output[0]
    return [name for name, shape in shapes.items() if len(shape) == 3 and shape[0] == batch and shape[1] != batch]


def float_01(mask: Any) -> bool:
    """Whether ``mask`` is a floating-point tensor of 0s and 1s with at least one 1: given to
    ``nn.MultiheadAttention`` (``attn_mask``, ``key_padding_mask``) it is *added* to the scores — its 1s raise them by
    1 and mask nothing, where a boolean mask (True: masked) or −inf was meant."""
    return (isinstance(mask, Tensor) and mask.is_floating_point() and mask.numel() > 0
            and bool(((mask == 0) | (mask == 1)).all()) and bool((mask == 1).any()))


MASKED_BELOW = -1e4  # an additive mask entry at or below this masks its key (−inf, or finfo.min, as libraries write it)


def masked_keys(mask: Any) -> Tensor | None:
    """The keys a key-padding mask hides, as booleans: True entries of a boolean mask, entries at or below
    ``MASKED_BELOW`` of an additive float one (PyTorch's Transformer layers turn a boolean mask into −inf/0 before
    ``nn.MultiheadAttention`` sees it); None for anything else."""
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return None
    if mask.dtype == torch.bool:
        return mask
    return mask <= MASKED_BELOW if mask.is_floating_point() else None


def inverted_padding(mask: Any, tokens: Any) -> int | None:
    """The token id a key-padding mask leaves as the only one attended, where it reads as inverted; else None.

    Inverted means, against the model's integer input of the mask's (batch, seq) shape: the keys left attended all
    hold one and the same token id (the padding), while the keys it hides hold two or more — the mask hides the text
    and leaves the padding, as Hugging Face's ``attention_mask`` (1 = a real token) does given as PyTorch's
    ``key_padding_mask``/``src_key_padding_mask`` (True = ignore). A mask that hides only the padding reads the other
    way round and is not inverted."""
    hidden = masked_keys(mask)
    if hidden is None or not isinstance(tokens, Tensor) or tokens.shape != hidden.shape or tokens.is_floating_point():
        return None
    seen, kept = tokens[hidden], tokens[~hidden]
    if not len(seen) or not len(kept):
        return None
    ids = torch.unique(kept)
    if len(ids) != 1 or len(torch.unique(seen)) < 2:
        return None
    return int(ids[0])


def integer_inputs(args: tuple, kwargs: dict[str, Any]) -> list[Tensor]:
    """The 2-D integer tensors a model is called with (token ids), positional first."""
    return [x for x in (*args, *kwargs.values())
            if isinstance(x, Tensor) and x.dim() == 2 and not x.is_floating_point() and x.dtype != torch.bool]


class LayoutSeen:
    """Forward pre-hooks that note, at the first forward pass with gradient, each seq-first layer's input shape and
    each ``nn.MultiheadAttention``'s masks, and a hook on the model that then writes the layers that pass misread
    (meta ``batch_axis_misread``: [{"module", "type", "input", "batch"}]), the attention modules given a float
    mask of 0s and 1s (meta ``float_01_masks``: [{"module", "mask"}]) and those given a key-padding mask that reads
    as inverted against the model's token ids (meta ``inverted_padding_masks``: [{"module", "token"}],
    :func:`inverted_padding`) — [] where none is — and removes every hook. No hook at all where the model has
    neither kind of layer."""

    def __init__(self, model: nn.Module, write: Callable[[dict[str, Any]], None],
                 guard: Callable[..., Any]) -> None:
        self._layers = dict(seq_first(model))
        self._shapes: dict[str, list[int]] = {}
        self._masks: list[dict[str, str]] = []
        self._inverted: list[dict[str, Any]] = []
        self._tokens: list[Tensor] = []
        self._write = write
        self.handles = [m.register_forward_pre_hook(lambda mod, args, name=name: guard(self._on, name, args))
                        for name, m in self._layers.items()]
        self.handles += [m.register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: guard(self._on_attention, name, args, kwargs), with_kwargs=True)
            for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
        if self.handles:
            self.handles.append(model.register_forward_pre_hook(
                lambda mod, args, kwargs: guard(self._on_model, args, kwargs), with_kwargs=True))
            self.handles.append(model.register_forward_hook(lambda mod, args, out: guard(self._finish, out)))

    def _on_model(self, args: tuple, kwargs: dict[str, Any]) -> None:
        self._tokens = integer_inputs(args, kwargs) if torch.is_grad_enabled() else []

    def _on(self, name: str, args: tuple) -> None:
        if name not in self._shapes and args and isinstance(args[0], Tensor):
            self._shapes[name] = list(args[0].shape)

    def _on_attention(self, name: str, args: tuple, kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled() or any(m["module"] == name for m in (*self._masks, *self._inverted)):
            return
        given = {"attn_mask": kwargs.get("attn_mask", args[5] if len(args) > 5 else None),
                 "key_padding_mask": kwargs.get("key_padding_mask", args[3] if len(args) > 3 else None)}
        self._masks += [{"module": name, "mask": which} for which, mask in given.items() if float_01(mask)]
        token = next((t for x in self._tokens if (t := inverted_padding(given["key_padding_mask"], x)) is not None), None)
        if token is not None:
            self._inverted.append({"module": name, "token": token})

    def _finish(self, out: Any) -> None:
        if not torch.is_grad_enabled():
            self._shapes.clear()  # a pass autograd did not record (evaluation): wait for a training one
            self._masks.clear()
            self._inverted.clear()
            return
        names = misread(self._shapes, list(out.shape)) if isinstance(out, Tensor) else []
        self._write({"batch_axis_misread": [
            {"module": n, "type": type(self._layers[n]).__name__, "input": self._shapes[n], "batch": int(out.shape[0])}
            for n in names], "float_01_masks": list(self._masks), "inverted_padding_masks": list(self._inverted)})
        self._tokens = []
        for h in self.handles:
            h.remove()
        self.handles = []


@torch.no_grad()
def misread_layers(model: nn.Module, x: Any) -> list[str]:
    """The seq-first layers that one evaluation-mode pass of ``model(x)`` gives its batch along dimension 0 (the
    doctor's row finds them so, on a batch of the trial's own): the pass leaves the random state and the model's
    mode as they were, and its running statistics (evaluation mode uses, never updates, them)."""
    layers = dict(seq_first(model))
    if not layers:
        return []
    shapes: dict[str, list[int]] = {}

    def note(name: str, args: tuple) -> None:
        if name not in shapes and args and isinstance(args[0], Tensor):
            shapes[name] = list(args[0].shape)

    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: note(name, args)) for name, m in layers.items()]
    was = model.training
    try:
        with torch.random.fork_rng(devices=[]):
            model.eval()
            out = model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return misread(shapes, list(out.shape)) if isinstance(out, Tensor) else []
