"""Eager calls of the registered Triton ops without the dispatcher round trip.

Each fused op is registered with torch.library.custom_op (plus a fake kernel and
register_autograd), which is what torch.compile, torch.export and opcheck need. In eager mode
that registration costs host time on every call: the dispatcher, the schema's defaults, and the
autograd wrapper torch.library generates. Measured on the 2-core CPU VM with the kernels
replaced by stubs that only allocate the outputs (bench/host_overhead.py, bench/NOTES.md "Issue
12: the ops' host path"): one attention forward + backward through the custom op cost about
2.4x as much host time as the same two kernel calls through a plain autograd.Function. On a GPU
the step is host-bound (a DTL training step runs ~12 attention and 2 RNN op pairs), so that
difference is most of what an eager step spends outside the kernels.

`eager_op` gives an op a second entry point that calls the op's implementation and its
autograd formula (the same setup_context / backward functions register_autograd takes)
directly, whenever that is safe:
- not while torch.compile traces (dynamo must see the registered op and its fake kernel),
- not under a TorchDispatchMode (make_fx / non-strict export / FakeTensorMode would not see a
  Triton launch), nor under torch.jit tracing or a functorch transform,
- only for plain torch.Tensor arguments (no FakeTensor or other subclass).
Anywhere else the call goes to the registered op, as before. Both entry points run the same
Python implementation, so they launch the same kernels on the same arguments and give bitwise
the same outputs and gradients (tests/test_ops_eager.py).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch.autograd import forward_ad
from torch._C import _functions as _autograd_functions  # DelayedError, as once_differentiable uses it


def eager_ok(args) -> bool:
    """True when a call with `args` may bypass the registered op (see the module docstring)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch._C._get_tracing_state() is not None:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    for a in args:
        # plain tensors and nn.Parameter (its __torch_function__ is disabled: the same ops)
        if isinstance(a, torch.Tensor) and type(a) not in _PLAIN:
            return False
    return True


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def transforms_in_use(tensors=()) -> tuple[str, ...]:
    """The autograd transforms around a call, as the fused ops' dispatch needs to know them:
    the active torch.func transforms ("vmap", "grad" -- torch.func.grad / vjp / jacrev --,
    "jvp"; outermost first) and "forward_ad" when one of `tensors` carries a forward-mode
    tangent. torch.func.functionalize is left out: it involves no autograd, and the registered
    ops pass through it. () in the common case, for one interpreter-stack peek and one module
    global; inside an open forward_ad.dual_level every tensor scanned costs ~10 us (unpack_dual
    makes a view), so callers scan once per call, likeliest duals first. Not meant for use
    while torch.compile traces (the registered ops and their fake kernels serve there)."""
    names: tuple[str, ...] = ()
    if torch._C._functorch.peek_interpreter_stack() is not None:
        try:
            names = tuple(n for n in (str(i.key()).rsplit(".", 1)[-1].lower()
                                      for i in torch._C._functorch.get_interpreter_stack())
                          if n != "functionalize")
        except Exception:  # noqa: BLE001  (a private API: if it moves, assume the worst)
            names = ("unknown",)
    if forward_ad._current_level >= 0 and any(
            isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None
            for t in tensors):
        names += ("forward_ad",)
    return names


def needs_stock_path(used: tuple[str, ...]) -> bool:
    """True when transforms_in_use's `used` holds one the fused kernels cannot serve: any but
    vmap (their registered ops' batching fallback runs them per sample)."""
    return any(n != "vmap" for n in used)


def refuse_transforms(what: str, used: tuple[str, ...]) -> None:
    """Raises NotImplementedError naming `what` when `used` (transforms_in_use) holds a
    transform the fused kernels cannot serve (needs_stock_path): instead of torch's error
    about autograd.Function internals, or, for forward-mode AD, a silently dropped tangent."""
    if not needs_stock_path(used):
        return
    if "forward_ad" in used or "jvp" in used:
        raise NotImplementedError(f"{what}: forward-mode AD (torch.autograd.forward_ad, "
                                  "torch.func.jvp / jacfwd) is not supported by the fused "
                                  "kernels; use backend='auto' or 'reference'")
    names = ", ".join("grad (torch.func.grad / vjp / jacrev)" if n == "grad" else n
                      for n in dict.fromkeys(n for n in used if n != "vmap"))
    raise NotImplementedError(f"{what}: the torch.func transform {names} cannot see through the "
                              "fused kernels' autograd; use backend='auto' or 'reference'")


# a BatchedTensor of torch._vmap_internals (autograd.grad's is_grads_batched), which
# torch.func's interpreter stack does not show
_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def _needs_grad(args) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def no_double_backward(backward: Callable, name: str) -> Callable:
    """`backward(ctx, *grads, saved=None)` (an autograd formula over the fused kernels, which
    have no derivative of their own) made to refuse second-order gradients loudly.

    `backward` takes the unpacked saved tensors as the keyword-only argument `saved` and reads
    ctx.saved_tensors itself when it is None (checked here, at registration: TypeError).

    Without create_graph (grad mode off inside the backward) it is `backward` itself: no extra
    work. Under create_graph=True the saved tensors are unpacked once (passed to `backward` as
    `saved`: each unpack runs the saved-tensor hooks again, e.g. a copy back from CPU offload),
    the gradients are computed as usual (grad mode off: the kernels' results carry no graph)
    and then passed through one DelayedError node whose edges go to every grad_output and saved
    tensor that requires grad. A saved output leads back to this node's own forward, and through
    it to every input, so any differentiation of the gradients that depends on the op --
    .backward(), torch.autograd.grad(..., inputs=[...]), torch.autograd.functional.hessian /
    hvp -- reaches the node and raises, naming backend='reference'. (Fresh detached leaves as
    the node's only inputs, as once_differentiable makes, are reached only by .backward():
    autograd.grad(inputs=...) prunes the node and the second-order term silently drops out.)

    Every fused op's setup_context saves one of the forward's outputs. For a formula whose ctx
    saves none, the node's edges go instead to the op's inputs that require grad: the leaves
    among them (from ctx.next_functions) and the saved inputs; an input that is neither (a
    non-leaf the op did not save) cannot be reached, and the backward raises a RuntimeError
    asking the op to save an output, rather than drop the second-order term silently."""
    param = inspect.signature(backward).parameters.get("saved")
    if param is None or param.kind not in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
        raise TypeError(f"no_double_backward({name}): the backward formula must take the unpacked "
                        "saved tensors as the keyword-only argument `saved` (None: read "
                        "ctx.saved_tensors), so that create_graph=True unpacks them once")
    message = (f"{name}: the fused kernels' backward has no derivative of its own (no "
               "second-order gradients: create_graph=True, gradient penalties, "
               "torch.autograd.functional.hessian / hvp / vhp, and its jvp, which takes the "
               "double-backward route); use backend='reference' for those").encode()

    def backward_once(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        for g in grads:
            # batched gradients (is_grads_batched, jacobian(vectorize=True)) with create_graph:
            # the error node over PyTorch's legacy BatchedTensors crashes the process (a
            # segfault in torch itself), so refuse here, at once, with the same message
            if g is not None and _legacy_batched(g):
                raise RuntimeError(message.decode() + " (here: create_graph=True with batched "
                                   "gradients, is_grads_batched or jacobian(vectorize=True))")
        saved = ctx.saved_tensors  # unpacked once, for the formula and for the error node
        with torch.no_grad():
            result = backward(ctx, *grads, saved=saved)
        single = not isinstance(result, tuple)
        result = (result,) if single else result
        deps = [t for t in (*grads, *saved) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not any(t.grad_fn is ctx for t in deps):  # no saved output leads back to the forward
            deps += _input_deps(ctx, deps, name)
        if not deps:  # nothing upstream requires grad: the gradients are constants
            return result[0] if single else result
        n = len(result)
        marked = [g if isinstance(g, torch.Tensor) and g.is_floating_point() else None
                  for g in result]
        out = _autograd_functions.DelayedError(message, n + len(deps))(*marked, *deps)[:n]
        out = tuple(o if m is not None else g for o, m, g in zip(out, marked, result))
        return out[0] if single else out

    backward_once.__name__ = getattr(backward, "__name__", "backward")
    return backward_once


def _input_deps(ctx, deps: list, name: str) -> list:
    """The error node's extra edges for an op whose ctx saved none of its outputs: the leaf
    inputs that require grad (their AccumulateGrad nodes hold them). A non-leaf input that no
    tensor in `deps` is the output of cannot be reached from here: a RuntimeError for the op's
    author, not a silently lost second-order term."""
    extra = []
    for i, (node, nr) in enumerate(ctx.next_functions):
        if node is None:  # an input that does not require grad
            continue
        if isinstance(node, _autograd_functions.AccumulateGrad):
            extra.append(node.variable)
        elif not any(t.grad_fn is node and t.output_nr == nr for t in deps):
            raise RuntimeError(
                f"{name}: under create_graph=True the second-order guard (no_double_backward) "
                f"cannot reach the op's tensor input {i} (counting tensor arguments only): its setup_context saved none of the "
                "forward's outputs, and that input is a non-leaf tensor it did not save. Save "
                "one output with ctx.save_for_backward (every fused op does)")
    return extra


def eager_op(op, impl: Callable, setup_context: Callable | None = None,
             backward: Callable | None = None, name: str = "FusedOp",
             grad_args: int = 0) -> Callable:
    """A callable with the signature of the registered op `op` (all arguments positional,
    defaults included) that runs `impl` (the op's Python body) directly when eager_ok, through
    an autograd.Function built from the op's own `setup_context(ctx, inputs, output)` and
    `backward(ctx, *grads, saved=None)` (see no_double_backward) when a gradient is needed;
    `op` itself otherwise.

    Gradients of outputs that took no part in the loss reach `backward` as None (not
    materialised zeros: the backward formulas handle None). Under create_graph=True the
    gradients carry a node that raises when they are differentiated (no_double_backward).
    `call.eager(*args)` skips the eager_ok check (for a caller that made it, and whose `impl`
    need not have the op's signature).

    grad_args: for an op that a backward formula calls (no autograd of its own), how many
    leading arguments are gradients. torch.autograd.grad(..., is_grads_batched=True), and so
    torch.autograd.functional.jacobian / hessian(vectorize=True), runs the backward under
    PyTorch's legacy vmap, whose BatchedTensors hold no storage a Triton kernel can read
    ("Cannot access storage of BatchedTensorImpl"): such a call goes to the registered op,
    whose batching fallback runs it once per sample. Only those arguments are looked at (the
    saved ones never come batched): ~0.1 us a tensor, once per backward."""
    fn = None
    if backward is not None:
        def forward(ctx, *args):
            ctx.set_materialize_grads(False)
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        fn = type(name, (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(no_double_backward(backward, name)),
        })

    label = getattr(op, "_qualified_op_name", str(op))  # e.g. dtl_fast::cosine_attention_fwd

    def eager(*args):
        if torch.autograd._profiler_enabled():
            # under torch.profiler the call still shows as the op it stands for (the
            # record_function costs ~30 us, so only then)
            with torch.autograd.profiler.record_function(label):
                return fn.apply(*args) if fn is not None and _needs_grad(args) else impl(*args)
        if fn is not None and _needs_grad(args):
            return fn.apply(*args)
        return impl(*args)

    if not grad_args:
        def call(*args):
            if fn is None and _needs_grad(args):
                # an op without an autograd formula called where autograd records (a backward
                # op under create_graph=True, after a forward that ran through the registered
                # op): the registered op, whose outputs raise when differentiated, not a
                # silently graph-less result
                return op(*args)
            return eager(*args) if eager_ok(args) else op(*args)
    elif fn is not None:
        raise ValueError("eager_op: grad_args is for ops without an autograd formula")
    else:
        def call(*args):  # a backward op: as above, and legacy-batched gradients to the op
            if _needs_grad(args):
                return op(*args)
            for g in args[:grad_args]:  # (inline: a generator or a helper costs 0.3-0.6 us more)
                if g is not None and _legacy_batched(g):
                    return op(*args)
            return eager(*args) if eager_ok(args) else op(*args)

    call.__doc__ = f"{op}, called without the dispatcher in eager mode (dtl_fast.ops._eager)."
    call.eager = eager  # for a caller that checked eager_ok itself
    return call
