"""LSTM and GRU: drop-in replacements for torch.nn.LSTM / torch.nn.GRU backed by dtl_fast's
recurrence ops (Triton kernels on CUDA, PyTorch's native kernels on CPU, or the eager loop).

Why these derive from nn.Module and not from torch.nn.LSTM / GRU: torch.compile refuses any
module that is an instance of torch.nn.RNN / GRU / LSTM ("Dynamo does not support RNN, GRU, or
LSTM", a graph break unless torch._dynamo.config.allow_rnn is set), so a subclass could never be
compiled with fullgraph=True, which is one of the reasons to use the fused kernels at all
(with backend='fused' or 'reference' when lengths are given: 'auto' then runs PyTorch's packed
kernel outside the graph, as torch.nn.LSTM would). What a subclass would have given for free
is rebuilt here: the same constructor, attributes, parameter names, shapes, registration order
and initialisation, so state_dicts load both ways (strict), the same forward contract,
PackedSequence included, torch.nn.RNNBase's public helpers (check_forward_args,
permute_hidden, ...) and its flatten_parameters (the weights as one cuDNN buffer on CUDA, as
torch.nn keeps them, for the cuDNN calls of backend 'auto'). `isinstance(m, torch.nn.LSTM)` is
False for these modules; code that needs to tell them apart can test for `dtl_fast.nn.LSTM`. Not drop-in for
TorchScript: torch.jit.script of a model holding one raises NotScriptableError (use
torch.compile, torch.export or torch.jit.trace).
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from dtl_fast._backend import outside_graph, resolve_backend
from dtl_fast._checks import autocast_enabled
from dtl_fast.reference import rnn as _ref_rnn

# The recurrence ops are imported when first called, so `import dtl_fast` keeps working (and
# these modules can still be built, loaded and swapped in) even when the op layer cannot load.
_OPS = None


def _ops():
    global _OPS
    if _OPS is None:
        from dtl_fast.ops import rnn as ops_rnn
        _OPS = ops_rnn
    return _OPS


def _forward_eager(module, input, hx, lengths):
    """module._forward(input, hx, lengths), run eagerly: what torch.compile calls where backend
    "auto" takes PyTorch's kernel (see _RNNBase.forward)."""
    return module._forward(input, hx, lengths)


# Under torch.compile, where auto takes PyTorch's kernel (a PackedSequence, lengths=, or padded
# input outside the measured fused region), the module's whole forward runs eagerly, outside
# the graph: one graph break at the module, where dynamo breaks for torch.nn.LSTM / GRU too (it
# does not trace RNN modules), and no frames of ours for dynamo to look at inside it (breaking
# deeper, in the op, cost ~80 us a call: 545 vs 467 us eager, bi-LSTM B16 T32 H64 on the CPU).
# Traced instead: the packed kernel's output would be a fake tensor whose row count depends on
# batch_sizes' values (torch 2.11 then fails in pad_packed_sequence, "RuntimeError when making
# fake tensor call"); lengths must be read on the host; and torch.lstm / gru decompose into a
# loop unrolled over T (0.40x compiled torch.nn in one CPU case, and slow to compile).
_OUTSIDE_GRAPH_REASON = (
    "dtl_fast LSTM/GRU(backend='auto') runs PyTorch's RNN kernel (cuDNN / oneDNN) outside the "
    "graph, as torch.compile runs torch.nn.LSTM / GRU: traced, torch.lstm / gru would decompose "
    "into a loop unrolled over T, and a PackedSequence or lengths= are read on the host. To keep "
    "one graph (fullgraph=True), set backend='fused' (CUDA, or the CPU under "
    "TRITON_INTERPRET=1) or backend='reference' on the module (module.backend = ..., "
    "DTL(..., backend=...), dtl-fast train --backend or DTL_FAST_BACKEND), with padded input "
    "and lengths= in place of a PackedSequence")
_forward_outside_graph = outside_graph(_forward_eager, _OUTSIDE_GRAPH_REASON)


def _packed_native_eager(module, input, hx):
    """module._packed_native(input, hx), run eagerly: a PackedSequence with backend "auto" where
    the forward stayed in the graph (inside a torch.func transform, see
    _RNNBase._compiled_auto_is_native; and under torch.export, which refuses the break)."""
    return module._packed_native(input, hx)


_packed_native_outside_graph = outside_graph(_packed_native_eager, _OUTSIDE_GRAPH_REASON)


class NotScriptableError(torch.jit.frontend.NotSupportedError):
    """torch.jit.script of a model holding a dtl_fast module. A subclass of the error
    TorchScript raises for unsupported Python (torch.jit.frontend.NotSupportedError), so code
    that catches that keeps working; it names the module and what to use instead."""

    def __init__(self, msg: str) -> None:
        Exception.__init__(self, msg)  # FrontendError's __init__ wants a TorchScript source range
        self.msg = msg
        self.source_range = None

    def __str__(self) -> str:
        return self.msg


def _not_scriptable(module: nn.Module):
    """Raises NotScriptableError for `module`. The modules' __prepare_scriptable__ calls it:
    torch.jit.script calls that hook on every module of the model it scripts before compiling
    anything (and nothing else calls it), so the user gets this message instead of a
    TorchScript compiler error pointing into dtl_fast's source."""
    # the dtl_fast class (a user's subclass has another name), as the user imports it
    cls = next((c for c in type(module).__mro__ if c.__module__.startswith("dtl_fast.")
                and not c.__name__.startswith("_")), type(module))
    import dtl_fast.nn
    where = "dtl_fast.nn" if getattr(dtl_fast.nn, cls.__name__, None) is cls else cls.__module__
    msg = (f"torch.jit.script: {where}.{cls.__name__} is not scriptable (dtl_fast's modules run "
           "Python-side argument checks, backend choice and custom ops that TorchScript cannot "
           "compile); use torch.compile, torch.export or torch.jit.trace, which all handle it")
    if cls.__name__ in ("LSTM", "GRU"):
        msg += (f", or script a model built with torch.nn.{cls.__name__} (it loads this "
                "module's state_dict)")
    raise NotScriptableError(msg)


class _RNNBase(nn.Module):
    """What LSTM and GRU share: torch.nn.RNNBase's constructor checks, parameters, extra_repr,
    and a forward that handles unbatched input and PackedSequence around the functional op."""

    __constants__ = ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                     "dropout", "bidirectional", "proj_size")

    mode: str
    _GATES: int

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, backend: str | None = None) -> None:
        super().__init__()
        # torch.nn.RNNBase.__init__'s checks, in its order, with its exception types and
        # messages, plus two it does not make (kept on purpose: stricter, never looser):
        # num_layers must be an int and not a bool (torch builds one layer for True) and
        # bidirectional a bool (torch takes any truthy value), else TypeError. LSTM checks
        # proj_size before these: its type too (TypeError), and > 0 is NotImplementedError
        # where torch accepts 0 < proj_size < hidden_size.
        if (not isinstance(dropout, numbers.Number) or isinstance(dropout, bool)
                or not 0 <= dropout <= 1):
            raise ValueError("dropout should be a number in range [0, 1] representing the "
                             "probability of an element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          "non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", stacklevel=3)
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        if not isinstance(input_size, int):
            raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):
            raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if not isinstance(num_layers, int) or isinstance(num_layers, bool):
            raise TypeError(f"num_layers should be of type int, got: {type(num_layers).__name__}")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if not isinstance(bidirectional, bool):
            raise TypeError(
                f"bidirectional should be of type bool, got: {type(bidirectional).__name__}")

        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = 0
        self.backend = backend

        factory_kwargs = {"device": device, "dtype": dtype}
        gate_size = self._GATES * hidden_size
        num_directions = 2 if bidirectional else 1
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for direction in range(num_directions):
                layer_input_size = input_size if layer == 0 else hidden_size * num_directions
                suffix = "_reverse" if direction == 1 else ""
                shapes = [("weight_ih", (gate_size, layer_input_size)),
                          ("weight_hh", (gate_size, hidden_size))]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                names = []
                for stem, shape in shapes:
                    name = f"{stem}_l{layer}{suffix}"
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory_kwargs)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()
        self.flatten_parameters()
        try:  # load the op layer now: the forward's first call under torch.compile reads
            _ops()  # _OPS, and a None there would be guarded on (a recompile at the second)
        except Exception:  # noqa: BLE001  (the module still builds; its forward then says why)
            pass

    # -- attributes torch.nn.RNNBase has ------------------------------------------------------

    @property
    def backend(self) -> str | None:
        """The backend: "auto" | "fused" | "reference", or None for $DTL_FAST_BACKEND (else
        "auto") read at each call. Settable; a bad value raises ValueError at assignment."""
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        if value is not None:
            resolve_backend(value)  # a typo fails here, not at the first forward
        # object.__setattr__: nn.Module.__setattr__ would look the name up in its dicts first.
        object.__setattr__(self, "_backend", value)

    @property
    def _flat_weights(self) -> list[torch.Tensor]:
        """The weights in torch's _flat_weights order, read afresh at every call so that
        .to(), load_state_dict(assign=True) and torch.func.functional_call are always seen.
        From _parameters where the name is there (what nn.Module.__getattr__ returns, without
        its ~0.4 us per weight), else getattr (torch.nn.utils.parametrize moves a parametrized
        weight out of _parameters into a property)."""
        params = self._parameters
        return [params[name] if name in params else getattr(self, name)
                for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def __prepare_scriptable__(self):
        _not_scriptable(self)

    # torch.nn.RNNBase's public helpers (some code calls them on an RNN it is given): torch's
    # own functions, which read only attributes these modules have (input_size, hidden_size,
    # num_layers, batch_first, bidirectional, proj_size = 0, _flat_weights), so they return and
    # raise exactly what they do on torch.nn.LSTM / GRU. forward does not use them.
    check_input = nn.RNNBase.check_input
    get_expected_hidden_size = nn.RNNBase.get_expected_hidden_size
    check_hidden_size = nn.RNNBase.check_hidden_size
    check_forward_args = nn.RNNBase.check_forward_args
    permute_hidden = nn.RNNBase.permute_hidden
    # torch's own too, and called where torch calls it (end of __init__, after every .to() /
    # .cuda() / .half()): on CUDA, in the dtypes cuDNN takes (float16 / float32 / float64; not
    # bfloat16, as torch), the weights become views of one buffer in cuDNN's layout. backend
    # "auto" runs cuDNN there (outside the measured fused region), which otherwise copies every
    # weight into a fresh buffer at each call and warns "RNN module weights are not part of
    # single contiguous chunk of memory". A no-op elsewhere. The fused kernels read the same
    # views (each weight stays contiguous).
    flatten_parameters = nn.RNNBase.flatten_parameters

    def _apply(self, fn, recurse=True):
        ret = super()._apply(fn, recurse)
        self.flatten_parameters()
        return ret

    def reset_parameters(self) -> None:
        """uniform(-1/sqrt(hidden_size), 1/sqrt(hidden_size)) for every weight and bias, as torch."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        s = s.format(**self.__dict__)
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s

    # -- conversion ---------------------------------------------------------------------------

    @classmethod
    def from_torch(cls, module: nn.Module, *, backend: str | None = None):
        """A dtl_fast module with `module`'s configuration, Parameters, device, dtype and
        train/eval mode.

        The Parameters are shared, not copied: the new module holds the very same
        nn.Parameter objects, so an optimizer built on the old module keeps updating the new
        one, tied weights stay tied, and no memory is duplicated. Hooks and other attributes of
        `module` are not carried over (swap_modules does that).

        Args:
            module: a torch.nn.LSTM for LSTM.from_torch, a torch.nn.GRU for GRU.from_torch
                (subclasses and dtl_fast's own modules of the same kind are accepted too).
            backend: the new module's backend (see the class docstring).

        Raises:
            TypeError: `module` is not an LSTM (GRU), or one of its weights is not a plain
                Parameter (e.g. under torch.nn.utils.parametrize or weight_norm).
            NotImplementedError: an LSTM with proj_size > 0.
        """
        torch_cls = getattr(nn, cls.mode)
        if not isinstance(module, (torch_cls, cls)):
            raise TypeError(f"{cls.__name__}.from_torch expects a torch.nn.{cls.mode}, got "
                            f"{type(module).__module__}.{type(module).__qualname__}")
        if getattr(module, "proj_size", 0) > 0:
            raise NotImplementedError(
                f"dtl_fast.nn.{cls.__name__} does not support proj_size > 0 (LSTM with "
                f"projections), got proj_size={module.proj_size}")
        with warnings.catch_warnings():
            # The dropout-with-one-layer warning was already given when `module` was built.
            warnings.simplefilter("ignore", UserWarning)
            new = cls(module.input_size, module.hidden_size, module.num_layers, module.bias,
                      module.batch_first, module.dropout, module.bidirectional,
                      device="meta", backend=backend)
        for name in new._flat_weights_names:
            param = module._parameters.get(name)
            if not isinstance(param, nn.Parameter):
                raise TypeError(
                    f"{cls.__name__}.from_torch: {name} of the given {cls.mode} is not a plain "
                    f"nn.Parameter (found {type(getattr(module, name, None)).__name__}); modules "
                    "under torch.nn.utils.parametrize or weight_norm cannot be converted")
            expected = tuple(getattr(new, name).shape)
            if tuple(param.shape) != expected:
                raise TypeError(f"{cls.__name__}.from_torch: {name} has shape {tuple(param.shape)}, "
                                f"expected {expected} for this configuration")
            setattr(new, name, param)
        new.train(module.training)
        # the shared Parameters as one cuDNN buffer on CUDA (a deep-copied or assign-loaded
        # torch module's are separate until its next .to()); `module` sees the same views
        new.flatten_parameters()
        return new

    # -- forward ------------------------------------------------------------------------------

    def _check_hx_dims(self, hx, batched: bool):
        raise NotImplementedError

    def _run_op(self, x, hx, lengths, batch_first):
        raise NotImplementedError

    def forward(self, input, hx=None, *, lengths=None):
        if torch.compiler.is_compiling() and self._compiled_auto_is_native(input, hx, lengths):
            return _forward_outside_graph(self, input, hx, lengths)
        return self._forward(input, hx, lengths)

    def _compiled_auto_is_native(self, input, hx, lengths) -> bool:
        """Under torch.compile (not torch.export): whether backend "auto" takes PyTorch's
        kernel for this call, so that the whole forward runs outside the graph (see
        _OUTSIDE_GRAPH_REASON): with a PackedSequence or lengths always (and for input of a
        wrong type, which the eager forward then rejects) and off CUDA, for padded CUDA input
        where dtl_fast.ops.rnn's rule says so (its fused region stays in the graph)."""
        if resolve_backend(self.backend) != "auto" or _ops()._exporting():
            return False
        if _ops().in_traced_transform(input):  # a break there fails inside dynamo
            return False
        if lengths is not None or not isinstance(input, torch.Tensor) or not input.is_cuda:
            return True  # (before reading the weights: dynamo would guard on each)
        return _ops()._compiled_auto_is_native(
            self.mode, input, hx, self._flat_weights, self.num_layers, self.bidirectional,
            self.batch_first, self.dropout, self.training, self.bias)

    def _forward(self, input, hx, lengths):
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError(f"{self.mode}: lengths= is for padded input; a PackedSequence "
                                 "carries its own lengths")
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if data.dim() != 2:
                raise RuntimeError(f"input must have 2 dimensions, got {data.dim()}")
            self._check_input_vs_module(data)
            hx = self._check_hx_dims(hx, batched=True)
            # Under torch.compile, auto reads no value of batch_sizes (each read is a graph
            # break): it takes PyTorch's packed kernel outside the graph, as torch.compile runs
            # torch.nn.LSTM / GRU, and as auto does for padded input with lengths
            # (dtl_fast.ops.rnn._dispatch).
            if resolve_backend(self.backend) == "auto":
                if torch.compiler.is_compiling():  # see _packed_native_eager
                    return _packed_native_outside_graph(self, input, hx)
                if self._auto_native_packed(data, batch_sizes):
                    return self._packed_native(input, hx)
            # Padded in the caller's batch order, like hx and h_n, so neither needs permuting.
            x, lengths = pad_packed_sequence(input)
            output, hidden = self._run_op(x, hx, lengths, batch_first=False)
            if sorted_indices is not None:
                output = output.index_select(1, sorted_indices)
                lengths = lengths.index_select(0, sorted_indices.cpu())
            data_out = pack_padded_sequence(output, lengths, enforce_sorted=True).data
            return PackedSequence(data_out, batch_sizes, sorted_indices, unsorted_indices), hidden

        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{self.mode}: input must be a Tensor or a PackedSequence, got "
                            f"{type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"{self.mode}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        self._check_input_vs_module(input)
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
            if isinstance(lengths, numbers.Integral) or (
                    isinstance(lengths, torch.Tensor) and lengths.dim() == 0):
                lengths = lengths.reshape(1) if isinstance(lengths, torch.Tensor) else [int(lengths)]
        hx = self._check_hx_dims(hx, batched)
        output, hidden = self._run_op(input, hx, lengths, batch_first=self.batch_first)
        if not batched:
            output = output.squeeze(batch_dim)
            hidden = (tuple(h.squeeze(1) for h in hidden) if isinstance(hidden, tuple)
                      else hidden.squeeze(1))
        return output, hidden

    def _auto_native_packed(self, data: torch.Tensor, batch_sizes: torch.Tensor) -> bool:
        """Whether backend="auto" runs PyTorch's kernel for this PackedSequence (the op layer's
        rule, dtl_fast.ops.rnn.auto_path: always on the CPU, on CUDA where no measured row puts
        a fused kernel ahead); then it goes in packed, without the pad / pack round trip."""
        B, T = (int(batch_sizes[0]), len(batch_sizes)) if len(batch_sizes) else (0, 0)
        return _ops().auto_path(self.mode, _ops().rule_dtype(data), B, self.hidden_size, T,
                                2 if self.bidirectional else 1, batch_sizes, data.device) == "native"

    def _packed_native(self, input: PackedSequence, hx):
        """PyTorch's own packed-sequence RNN kernel, the call torch.nn.LSTM / GRU make: with
        backend "auto" (see _auto_native_packed) a PackedSequence goes straight in, without the
        pad / pack round trip. The op layer's checks do not run on this path, so the ones that
        concern a PackedSequence run here, with the op layer's messages (what the padded path
        and the other backends raise): every weight on the data's device (named by parameter),
        the input feature size, and hx's shape, dtype (float, the data's) and device."""
        data, batch_sizes, sorted_indices, unsorted_indices = input
        weights = self._flat_weights
        device = data.device
        for name, w in zip(self._flat_weights_names, weights):
            if w.device != device:
                self._raise_device(name, w, data)
        # the weights' shapes and dtypes and the input feature size, as the padded path checks
        # them (remembered per signature: a dict lookup after the first call); a [1, N, I] view
        # of the data stands for the input
        _ref_rnn.check_rnn_args(self.mode, data.unsqueeze(0), weights,
                                num_layers=self.num_layers, bidirectional=self.bidirectional,
                                dropout=self.dropout, has_bias=self.bias)
        D = 2 if self.bidirectional else 1
        # B from the permutation's length where there is one: a shape, where batch_sizes[0] is
        # a value (a host read, and a graph break under torch.compile)
        B = sorted_indices.numel() if sorted_indices is not None else int(batch_sizes[0])
        if hx is None:
            zeros = data.new_zeros(self.num_layers * D, B, self.hidden_size)
            hs = (zeros, zeros) if self.mode == "LSTM" else (zeros,)
        else:
            hs = hx if self.mode == "LSTM" else (hx,)
            expected = (self.num_layers * D, B, self.hidden_size)
            if any(h.shape != expected or h.dtype != data.dtype or h.device != device for h in hs):
                # The op layer's check for its message (and autocast's exemption from the dtype
                # match); it reads B (dim 1), the dtype and the device of a [T, B, I] input: a
                # view of the data's first step stands for it.
                hs = _ref_rnn.check_hx(self.mode, hx, data[:B].unsqueeze(0), self.hidden_size, D,
                                       self.num_layers, batch_first=False)
            if sorted_indices is not None:
                hs = tuple(h.index_select(1, sorted_indices) for h in hs)
        fn = torch.lstm if self.mode == "LSTM" else torch.gru
        out, *state = fn(data, batch_sizes, hs if self.mode == "LSTM" else hs[0],
                         weights, self.bias, self.num_layers, self.dropout,
                         self.training, self.bidirectional)
        if unsorted_indices is not None:
            state = [h.index_select(1, unsorted_indices) for h in state]
        hidden = (state[0], state[1]) if self.mode == "LSTM" else state[0]
        return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), hidden

    def _raise_device(self, name: str, w: torch.Tensor, x: torch.Tensor):
        raise ValueError(f"{self.mode}: {name} is on {w.device}, input on {x.device}; move the "
                         f"module (module.to({str(x.device)!r})) or the input")

    def _check_input_vs_module(self, x: torch.Tensor) -> None:
        """x (the padded input or a PackedSequence's data) on weight_ih_l0's device (ValueError
        naming the parameter: a module and an input on different devices; the op layer would
        name it weights[0]) and of its dtype (torch.nn.RNNBase.check_input's ValueError),
        except under torch.autocast. One weight only, at no measurable cost: the op layer checks
        every weight (a module whose weights are split over devices gets its weights[i]
        message), and _packed_native, which bypasses the op layer, checks them all here."""
        w = self.weight_ih_l0
        if w.device != x.device:
            self._raise_device("weight_ih_l0", w, x)
        if x.dtype != w.dtype and not autocast_enabled(x.device.type):
            raise ValueError(
                f"RNN input dtype ({x.dtype}) does not match weight dtype ({w.dtype}). Convert "
                f"input: input.to({w.dtype}), or convert model: model.to({x.dtype})")

    def _op_kwargs(self, lengths, batch_first):
        return {"lengths": lengths, "num_layers": self.num_layers,
                "bidirectional": self.bidirectional, "batch_first": batch_first,
                "dropout": self.dropout, "training": self.training, "has_bias": self.bias,
                "backend": self.backend}


class LSTM(_RNNBase):
    """Drop-in torch.nn.LSTM (gates i, f, g, o; same equations, parameters and state_dict).

    LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
         bidirectional=False, proj_size=0, device=None, dtype=None, *, backend=None)

    backend: "auto" | "fused" | "reference", or None to read $DTL_FAST_BACKEND (else "auto")
    at each call; settable after construction (`lstm.backend = "fused"`). "auto" runs
    PyTorch's native kernels on CPU tensors and, on CUDA, cuDNN except where a measured GPU row
    puts the Triton kernels ahead (dtl_fast.ops.rnn.auto_rule()); "fused" always the Triton
    kernels. proj_size > 0 raises NotImplementedError.

    forward(input, hx=None, *, lengths=None) -> (output, (h_n, c_n)):
        input: [T, B, input_size] ([B, T, input_size] if batch_first), [T, input_size]
            (unbatched), or a PackedSequence; float32 / float64 / float16 / bfloat16, the
            weights' dtype (any under torch.autocast).
        hx: None (zeros) or (h_0, c_0), each [num_layers * D, B, hidden_size] ([num_layers * D,
            hidden_size] unbatched), in the caller's batch order also for a PackedSequence;
            D = 2 if bidirectional else 1.
        lengths: padded input only: None (all T steps) or B ints in [1, T] (list or integer
            tensor). Steps t >= lengths[b] are not read; their output is zero, and the reverse
            direction starts at each sequence's last valid step.
        output: [T, B, D * hidden_size] in the input's layout (squeezed when unbatched), or a
            PackedSequence with the input's batch_sizes, sorted_indices and unsorted_indices.
        h_n, c_n: [num_layers * D, B, hidden_size], from each sequence's last valid step, in
            the caller's batch order.
    Dropout (between layers) follows self.training.
    """

    mode = "LSTM"
    _GATES = 4

    # torch.nn.LSTM's versions of the helpers (h_0 and c_0; see _RNNBase)
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, backend: str | None = None) -> None:
        if not isinstance(proj_size, int) or isinstance(proj_size, bool):
            raise TypeError(f"proj_size should be of type int, got: {type(proj_size).__name__}")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size > 0 and isinstance(hidden_size, int) and proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")  # torch's words
        if proj_size > 0:
            raise NotImplementedError(
                f"dtl_fast.nn.LSTM does not support proj_size > 0 (LSTM with projections), got "
                f"proj_size={proj_size}; use torch.nn.LSTM for it")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, backend=backend)

    def _check_hx_dims(self, hx, batched):
        if hx is None:
            return None
        if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(
                isinstance(h, torch.Tensor) for h in hx):
            raise TypeError("LSTM: hx must be None or a tuple (h_0, c_0) of two tensors, got "
                            f"{type(hx).__name__}")
        if batched and (hx[0].dim() != 3 or hx[1].dim() != 3):
            raise RuntimeError("For batched 3-D input, hx and cx should also be 3-D but got "
                               f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
        if not batched:
            if hx[0].dim() != 2 or hx[1].dim() != 2:
                raise RuntimeError("For unbatched 2-D input, hx and cx should also be 2-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            return (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        return (hx[0], hx[1])

    def _run_op(self, x, hx, lengths, batch_first):
        if hx is not None:
            hx = (hx[0], hx[1])
        return _ops().lstm(x, hx, self._flat_weights, **self._op_kwargs(lengths, batch_first))


class GRU(_RNNBase):
    """Drop-in torch.nn.GRU (PyTorch's equations, n = tanh(W_in x + b_in + r * (W_hn h + b_hn));
    same parameters and state_dict).

    GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
        bidirectional=False, device=None, dtype=None, *, backend=None)

    forward(input, hx=None, *, lengths=None) -> (output, h_n): as dtl_fast.nn.LSTM, with hx
    None or h_0 [num_layers * D, B, hidden_size] ([num_layers * D, hidden_size] unbatched).
    """

    mode = "GRU"
    _GATES = 3

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, backend: str | None = None) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, backend=backend)

    def _check_hx_dims(self, hx, batched):
        if hx is None:
            return None
        if not isinstance(hx, torch.Tensor):
            raise TypeError(f"GRU: hx must be None or a tensor h_0, got {type(hx).__name__}")
        if batched and hx.dim() != 3:
            raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
        if not batched:
            if hx.dim() != 2:
                raise RuntimeError(
                    f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
            return hx.unsqueeze(1)
        return hx

    def _run_op(self, x, hx, lengths, batch_first):
        return _ops().gru(x, hx, self._flat_weights, **self._op_kwargs(lengths, batch_first))
