"""ONNX export at a fixed resolution, verified in onnxruntime.

:func:`export_onnx` works on a deep copy of the model (the caller's model is never modified) and first
*freezes it for the resolution* (:func:`freeze_for_resolution`):

* every :class:`~hybridvision.ops.ParC2d` gets its instance kernel and position embedding for the length it sees
  at that resolution, computed once by its public :meth:`~hybridvision.ops.ParC2d.set_base_size` (no
  interpolation is left in the graph), and the circular convolution is pinned to one form:
  ``"conv"`` (circular ``Pad(mode="wrap")`` + ``Conv``, the official ParC form), ``"matmul"`` (circulant
  ``MatMul``) or ``"fft"`` (ONNX ``DFT``; depthwise layers only, dense layers keep ``"conv"``);
* every :class:`~hybridvision.ops.RelPosBias2d` is replaced by its bias for the grid it sees, a constant
  ``(heads, N, N)`` tensor (:class:`FixedRelPosBias`).

The model is then exported with torch's dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``), whose
onnxscript optimizer folds constants and folds eval-mode BatchNorm into the preceding Conv where that is exact
(the Conv's output feeds only the BatchNorm); :func:`fold_batchnorm_into_next_conv` then folds the pre-norm
BatchNorms into the 1×1 Conv that follows them. :func:`verify_onnx` compares onnxruntime with eager PyTorch.
"""
from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from hybridvision.ops import ParC2d, RelPosBias2d

__all__ = [
    "EXPORT_METHODS",
    "FixedRelPosBias",
    "export_onnx",
    "fold_batchnorm_into_next_conv",
    "freeze_for_resolution",
    "onnx_op_types",
    "verify_onnx",
]

EXPORT_METHODS = ("conv", "matmul", "fft")
_CIRCULAR_METHOD = {"conv": "direct", "matmul": "gemm", "fft": "fft"}
DEFAULT_METHOD = "conv"


def _require(*modules: str) -> None:
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise RuntimeError(
            f"ONNX export needs the optional packages {', '.join(missing)}: "
            "pip install 'hybridvision[export]' -c constraints.txt"
        )


def _check_input_size(input_size: Sequence[int]) -> tuple[int, int, int, int]:
    size = tuple(int(s) for s in input_size)
    if len(size) != 4 or any(s < 1 for s in size):
        raise ValueError(f"input_size={tuple(input_size)}: expected (B, C, H, W) with positive sizes, e.g. (1, 3, 224, 224)")
    return size  # type: ignore[return-value]


class FixedRelPosBias(nn.Module):
    """A relative position bias frozen for one token grid (what :func:`freeze_for_resolution` puts in place of a
    :class:`~hybridvision.ops.RelPosBias2d`).

    Args:
        bias: ``(heads, N, N)`` the bias for ``grid``; stored as a buffer.
        grid: ``(h, w)`` with ``h * w == N``.

    ``forward(grid, dtype=None)`` has :class:`RelPosBias2d`'s signature and returns the stored bias.
    """

    def __init__(self, bias: torch.Tensor, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, grid: int | tuple[int, int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Returns the ``(heads, N, N)`` bias; ``grid`` must be the frozen one."""
        g = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
        if g != self.grid:
            raise ValueError(
                f"this model was frozen for a {self.grid[0]}x{self.grid[1]} attention grid but got {g[0]}x{g[1]}; "
                "export again at the resolution you run"
            )
        return self.bias if dtype is None else self.bias.to(dtype)

    def extra_repr(self) -> str:
        return f"heads={self.bias.shape[0]}, grid={self.grid}"


def _trial_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``model(x)`` once, turning a failure into a message about the resolution."""
    try:
        with torch.no_grad():
            return model(x)
    except Exception as e:  # noqa: BLE001 - any failure here means the model cannot take this input
        info = getattr(model, "feature_info", None)
        stride = None
        if info:
            last = info[-1] if isinstance(info, (list, tuple)) else info.get_dicts()[-1]
            stride = last.get("reduction")
        hint = f" (its stride is {stride}: use multiples of {stride})" if stride else ""
        raise ValueError(
            f"{type(model).__name__} cannot take an input of shape {tuple(x.shape)}{hint}: {type(e).__name__}: {e}"
        ) from e


def freeze_for_resolution(
    model: nn.Module, input_size: Sequence[int], *, method: str | None = None
) -> nn.Module:
    """An eval-mode deep copy of ``model`` specialised to inputs ``x: (B, C, H, W)`` of ``input_size``.

    ParC layers get their instance kernel/PE for the resolution and the circular-convolution form ``method``
    (``"conv"`` default, ``"matmul"``, ``"fft"``); relative position biases become constants. The copy computes
    the same function as ``model`` at this resolution (and only at this resolution).

    Raises:
        ValueError: an unknown ``method``, a malformed ``input_size``, or a resolution the model cannot take.
    """
    method = method or DEFAULT_METHOD
    if method not in EXPORT_METHODS:
        raise ValueError(f"method={method!r}: expected one of {EXPORT_METHODS} (None = {DEFAULT_METHOD!r})")
    size = _check_input_size(input_size)
    frozen = copy.deepcopy(model).eval()
    p = next(frozen.parameters(), None)
    x = torch.zeros(1, *size[1:], device=p.device if p is not None else "cpu", dtype=p.dtype if p is not None else None)
    parc_len: dict[str, int] = {}
    rel_bias: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}
    handles = []
    for name, m in frozen.named_modules():
        if isinstance(m, ParC2d):
            def pre(mod: nn.Module, args: tuple, name: str = name) -> None:
                length = int(args[0].size(mod.dim))
                if parc_len.setdefault(name, length) != length:
                    raise ValueError(f"ParC layer {name} is called at two lengths ({parc_len[name]}, {length}); cannot freeze it")
            handles.append(m.register_forward_pre_hook(pre))
        elif isinstance(m, RelPosBias2d):
            def post(mod: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor, name: str = name) -> None:
                grid = args[0] if args else kwargs["grid"]
                g = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
                if name in rel_bias and rel_bias[name][0] != g:
                    raise ValueError(f"relative bias {name} is used on two grids ({rel_bias[name][0]}, {g}); cannot freeze it")
                rel_bias[name] = (g, out.detach())
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        _trial_forward(frozen, x)
    finally:
        for h in handles:
            h.remove()
    modules = dict(frozen.named_modules())
    for name, length in parc_len.items():
        m = modules[name]
        m.set_base_size(length)
        depthwise = m.groups == m.channels
        m.method = _CIRCULAR_METHOD["conv" if method == "fft" and not depthwise else method]
    for name, (grid, bias) in rel_bias.items():
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else frozen
        setattr(parent, attr, FixedRelPosBias(bias, grid))
    return frozen


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: Sequence[int] = (1, 3, 224, 224),
    *,
    dynamic_batch: bool = True,
    method: str | None = None,
    opset_version: int | None = None,
) -> Path:
    """Export ``model`` to ONNX for inputs ``x: (B, C, H, W)`` of ``input_size``.

    Args:
        model: any model (not modified: a frozen deep copy is exported, see :func:`freeze_for_resolution`).
        path: the ``.onnx`` file to write (one file, weights inside).
        input_size: ``(B, C, H, W)``; ``H, W`` are fixed in the graph.
        dynamic_batch: the batch axis of input ``"input"`` / output ``"output"`` is symbolic (``"batch"``).
        method: ParC form, ``"conv"`` (default), ``"matmul"`` or ``"fft"``.
        opset_version: ONNX opset (the exporter's default when ``None``; ``"conv"`` needs >= 19 for ``Pad`` wrap).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        RuntimeError: onnx / onnxscript missing (install the ``export`` extra).
        ValueError: a bad ``input_size`` / ``method`` or a resolution the model cannot take.
    """
    _require("onnx", "onnxscript")
    size = _check_input_size(input_size)
    frozen = freeze_for_resolution(model, size, method=method)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _export(frozen, path, size, dynamic_batch, method, opset_version)
    if dynamic_batch and not _batch_is_symbolic(path):
        # torch.onnx falls back to a static trace when the model specialises the batch (a size-dependent branch)
        warnings.warn(
            f"{type(model).__name__} specialises the batch size when traced at {size[2]}x{size[3]}, so the batch "
            f"axis could not stay dynamic; exported with a fixed batch of {size[0]} (export once per batch size)",
            stacklevel=2,
        )
        _export(frozen, path, size, False, method, opset_version)
    fold_batchnorm_into_next_conv(path)
    return path


def _export(
    frozen: nn.Module, path: Path, size: tuple[int, int, int, int], dynamic_batch: bool, method: str | None,
    opset_version: int | None,
) -> None:
    p = next(frozen.parameters(), None)
    batch = max(size[0], 2) if dynamic_batch else size[0]  # torch.export specialises a batch of 1
    x = torch.randn(batch, *size[1:], device=p.device if p is not None else "cpu")
    kwargs: dict[str, Any] = dict(
        dynamo=True, input_names=["input"], output_names=["output"], external_data=False, verbose=False
    )
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            with torch.no_grad():
                torch.onnx.export(frozen, (x,), str(path), **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with the way out
            if method != "fft":
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RuntimeError(
                f"the FFT form of ParC did not export to ONNX ({type(e).__name__}: {first}); "
                "export with method='conv' (default) or method='matmul'"
            ) from e


def _batch_is_symbolic(path: Path) -> bool:
    import onnx

    dim0 = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return bool(dim0.dim_param) or not dim0.HasField("dim_value")


def fold_batchnorm_into_next_conv(path: str | Path) -> int:
    """Fold eval-mode ``BatchNormalization`` nodes into the 1×1 ``Conv`` that consumes them, in place.

    The exporter folds Conv → BN; pre-norm blocks (CoAtNet's MBConv, ParC-Net) have BN → 1×1 Conv instead. For a
    1×1 convolution without padding the fold is exact (``W' = W·a``, ``b' = b + W·t`` with ``a = γ/√(σ²+ε)``,
    ``t = β - μ·a`` per input channel); it is done only where the BN output feeds nothing else and every
    parameter is an initializer. The folded weights are new initializers (shared ones stay intact).

    Returns:
        The number of BatchNormalization nodes removed.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    removed = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or bn.output[0] in outputs:
            continue
        users = consumers.get(bn.output[0], [])
        if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != bn.output[0]:
            continue
        conv = users[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        if (
            any(p not in inits for p in list(bn.input[1:5]) + list(conv.input[1 : 3 if has_bias else 2]))
            or any(int(v) != 0 for v in attrs.get("pads", []))
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID")
        ):
            continue
        w32 = numpy_helper.to_array(inits[conv.input[1]])
        if w32.shape[2:] != (1, 1):
            continue
        w = w32.astype(np.float64)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        eps = next((onnx.helper.get_attribute_value(a) for a in bn.attribute if a.name == "epsilon"), 1e-5)
        a = gamma / np.sqrt(var + eps)
        t = beta - mean * a
        groups = int(attrs.get("group", 1))
        c_out, c_in_g = w.shape[:2]
        channel = (np.arange(c_out)[:, None] // (c_out // groups)) * c_in_g + np.arange(c_in_g)[None, :]
        bias = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias else np.zeros(c_out)
        stem = f"{conv.output[0]}_bn_folded"
        graph.initializer.append(numpy_helper.from_array((w * a[channel][:, :, None, None]).astype(w32.dtype), f"{stem}_w"))
        new_b = bias + (w[:, :, 0, 0] * t[channel]).sum(1)
        graph.initializer.append(numpy_helper.from_array(new_b.astype(w32.dtype), f"{stem}_b"))
        conv.input[0] = bn.input[0]
        conv.input[1] = f"{stem}_w"
        if has_bias:
            conv.input[2] = f"{stem}_b"
        else:
            conv.input.append(f"{stem}_b")
        removed.append(bn)
    if removed:
        for bn in removed:
            graph.node.remove(bn)
        used = {n for node in graph.node for n in node.input} | outputs
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        onnx.save(model, str(path))
    return len(removed)


def onnx_op_types(path: str | Path) -> dict[str, int]:
    """``{op_type: count}`` over the main graph of the ONNX file at ``path``."""
    _require("onnx")
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def verify_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: Sequence[int],
    *,
    iters: int = 10,
    warmup: int = 2,
    seed: int = 0,
    ort_threads: int | None = None,
) -> dict:
    """onnxruntime (CPU) against eager PyTorch on one random input ``x: (B, C, H, W)`` of ``input_size``.

    Returns:
        ``{"rel_err": max|ort - torch| / max|torch|, "max_abs_err", "torch_ms", "ort_ms"}``: latencies are the
        median of ``iters`` runs per batch after ``warmup``; ``model`` is run in eval mode (restored afterwards).
        ``ort_threads`` sets onnxruntime's intra-op threads (``None``: its default); match it to
        ``torch.get_num_threads()`` for a like-for-like latency comparison.
    """
    _require("onnxruntime")
    import onnxruntime as ort

    size = _check_input_size(input_size)
    x = torch.randn(*size, generator=torch.Generator().manual_seed(seed))
    opts = ort.SessionOptions()
    if ort_threads is not None:
        opts.intra_op_num_threads = int(ort_threads)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    was_training = model.training
    model.eval()
    p = next(model.parameters(), None)
    xd = x.to(p.device) if p is not None else x
    try:
        with torch.inference_mode():
            ref = model(xd).float().cpu().numpy()

            def run_torch() -> None:
                model(xd)
                if xd.device.type == "cuda":
                    torch.cuda.synchronize()

            torch_ms = _median_ms(run_torch, iters, warmup)
    finally:
        model.train(was_training)
    out = sess.run(None, feed)[0]
    ort_ms = _median_ms(lambda: sess.run(None, feed), iters, warmup)
    if out.shape != ref.shape:
        raise RuntimeError(f"onnxruntime output shape {out.shape} != PyTorch output shape {ref.shape}")
    err = float(np.abs(out - ref).max())
    return {
        "rel_err": err / max(float(np.abs(ref).max()), 1e-12),
        "max_abs_err": err,
        "torch_ms": torch_ms,
        "ort_ms": ort_ms,
    }


def _median_ms(fn: Any, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(iters, 1)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]
