"""Mixed precision with the weights cast once per step instead of once per use.

Under autocast every matrix product casts its float32 weight and bias to the low precision,
in the forward pass, and casts their low-precision gradients back in backward: for the paper
preset's captured step 44 casts forward and 44 back (40 parameters, four of them used twice),
with the 59 gradient adds of a kept-gradient backward a quarter of the operations the step
dispatches (``benchmarks/step_overhead.py``). On a GPU at the recipe's batch size each is a
tiny kernel: in a CUDA graph it still costs a node, and in an eager step its dispatch is host
time the step waits on (issue 14: eager bf16 was slower than fp32 there).

:class:`PrecastWeights` keeps a low-precision copy of each parameter that the forward pass
only ever casts to the autocast dtype, found by :func:`precast_names` (one forward pass under
autocast, watching which parameters each operation reads). Per step:

- one multi-tensor copy refreshes the copies from the float32 parameters;
- the forward pass runs with the copies in place of those parameters (put in the modules'
  parameter slots for the call, as ``torch.func.functional_call`` does; compiled, through
  it): autocast finds them already cast;
- backward returns the gradients of the copies and of the other parameters
  (``torch.autograd.grad``), and two multi-tensor copies write them into the float32
  parameters' ``.grad`` (or add them, for the second and later micro-batch of a step);
- clipping and AdamW run on the float32 parameters and their gradients, as before.

The values are autocast's: a copy holds exactly the cast autocast would make, and a copy's
gradient is the low-precision gradient autocast would cast back. One difference: a weight
used in two products (a modality's projection, applied to the features and to the missing
token) has its two gradients summed in the low precision before the cast back, where autocast
sums them in float32.

The parameters' ``.grad`` tensors are written in place, never replaced: a step captured in a
CUDA graph reads and writes the same gradient tensors in every replay, and backward adds
nothing into them (no accumulation kernel per parameter, no zeroing).

With ``compile`` the forward with the copies is ``torch.compile``-d (dynamic shapes), and
backward with it: what ``train.compile`` means for a captured step.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from taemi.runtime import autocast_dtype


class _ParameterUses(TorchDispatchMode):
    """Which parameters an operation reads other than by a cast to ``dtype``.

    Parameters are known by their storage, so reads through views count too (a view itself
    reads nothing: it is skipped)."""

    def __init__(self, storages: dict[int, str], dtype: torch.dtype):
        super().__init__()
        self.storages, self.dtype = storages, dtype
        self.cast: set[str] = set()
        self.other: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not func.is_view:
            is_cast = func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == self.dtype
            for i, x in enumerate(tree_leaves((args, kwargs))):
                if not isinstance(x, torch.Tensor) or x.device.type == "meta":
                    continue
                name = self.storages.get(x.untyped_storage().data_ptr())
                if name is not None:
                    (self.cast if is_cast and i == 0 else self.other).add(name)
        return func(*args, **kwargs)


def precast_names(
    model: torch.nn.Module, batch, device: torch.device, dtype: torch.dtype
) -> list[str]:
    """The trainable parameters whose every read in ``model(batch)`` under autocast is a cast
    to ``dtype``, in ``named_parameters`` order.

    Runs one forward pass in evaluation mode without gradients (no dropout, so no random
    numbers drawn), then restores the model's mode."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    storages = {p.untyped_storage().data_ptr(): n for n, p in params.items()}
    uses = _ParameterUses(storages, dtype)
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=dtype, cache_enabled=False),
            uses,
        ):
            model(batch)
    finally:
        model.train(was_training)
    return [n for n in params if n in uses.cast and n not in uses.other]


class PrecastWeights:
    """The model's forward and backward with low-precision copies of the weights that autocast
    only casts (see the module docstring).

    ``names``: the parameters to keep copies of (:func:`precast_names`); every other trainable
    parameter is used as it is. :meth:`forward` must run under autocast to ``dtype``, as the
    model's own forward would."""

    def __init__(
        self,
        model: torch.nn.Module,
        names: list[str],
        dtype: torch.dtype,
        compile: bool = False,
    ):
        params = dict(model.named_parameters())
        self.model, self.names, self.dtype = model, list(names), dtype

        def call(weights: dict[str, torch.Tensor], batch) -> torch.Tensor:
            return torch.func.functional_call(model, weights, (batch,), strict=False)

        # ``compile``: the forward (and with it backward) compiled with dynamic shapes: one
        # compilation for the run's shapes (the first shape's, then one dynamic), kernels
        # fused; captured in CUDA graphs like the eager one. Not compiled, the copies are put
        # in the modules' parameter slots for the call and taken out after: the same as
        # functional_call, whose general bookkeeping cost as much host time as the casts
        # the copies save (benchmarks/README.md)
        self.compiled = compile
        self._compiled_call = torch.compile(call, dynamic=True) if compile else None
        self._slots = []  # (its module's parameter dict, key) of each precast parameter
        for name in self.names:
            owner, _, leaf = name.rpartition(".")
            self._slots.append((model.get_submodule(owner)._parameters, leaf))
        self.masters = [params[n] for n in self.names]
        with torch.no_grad():
            self.copies = [torch.empty_like(p, dtype=dtype).requires_grad_() for p in self.masters]
        chosen = set(self.names)
        self.others = [p for n, p in params.items() if p.requires_grad and n not in chosen]

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        batch,
        device: torch.device,
        precision: str,
        precast: bool = True,
        compile: bool = False,
    ) -> PrecastWeights:
        """Copies of the parameters the model's forward on ``batch`` only casts to the dtype
        of ``precision``; none for fp32 or without ``precast`` (autocast then casts at each
        use, and the gradients are still written in place). ``compile``: see ``__init__``."""
        if precision == "fp32" or not precast:
            return cls(model, [], torch.float32, compile)
        dtype = autocast_dtype(precision)
        return cls(model, precast_names(model, batch, device, dtype), dtype, compile)

    def refresh(self) -> None:
        """The copies from the current float32 parameters (one multi-tensor copy)."""
        if self.copies:
            with torch.no_grad():
                torch._foreach_copy_(self.copies, self.masters)

    def forward(self, batch) -> torch.Tensor:
        """Refresh the copies, then the model's forward with them in place of the parameters."""
        self.refresh()
        if self._compiled_call is not None:
            return self._compiled_call(dict(zip(self.names, self.copies)), batch)
        for (params, leaf), copy in zip(self._slots, self.copies):
            params[leaf] = copy
        try:
            return self.model(batch)
        finally:
            for (params, leaf), master in zip(self._slots, self.masters):
                params[leaf] = master

    def backward(self, loss: torch.Tensor, accumulate: bool = False) -> None:
        """Gradients of ``loss`` into every trainable parameter's ``.grad``: written over what
        is there, or added to it with ``accumulate`` (later micro-batches of one step)."""
        leaves = self.copies + self.others
        grads = torch.autograd.grad(loss, leaves, materialize_grads=True)
        n = len(self.copies)
        with torch.no_grad():
            for params, got in ((self.masters, grads[:n]), (self.others, grads[n:])):
                if not params:
                    continue
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                targets = [p.grad for p in params]
                if accumulate:
                    torch._foreach_add_(targets, [g.to(t.dtype) for g, t in zip(got, targets)])
                else:
                    torch._foreach_copy_(targets, list(got))

    def stats(self) -> dict:
        """What is precast (parameters, values, dtype) and whether the forward is compiled."""
        return {
            "precast_parameters": len(self.copies),
            "precast_values": sum(p.numel() for p in self.masters),
            "precast_dtype": str(self.dtype).removeprefix("torch.") if self.copies else None,
            "compiled": self.compiled,
        }
