"""ONNX export: onnxruntime parity, frozen ParC / relative bias (no Resize), BN folding, bad input, no mutation.
Every registered family: torch.compile / Dynamo, torch.func, and module hooks on the eager fast paths."""
import contextlib
import copy
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hybridvision.ops import ParC2d, RelAttention2d, RelPosBias2d
from hybridvision.tools.export import (
    FixedRelPosBias,
    export_onnx,
    freeze_for_resolution,
    onnx_op_types,
    verify_onnx,
)

ort = pytest.importorskip("onnxruntime")


class Toy(nn.Module):
    """conv-BN stem, a pre-norm BN -> grouped 1x1 conv residual, a depthwise ParC-H and a dense ParC-W (meta kernels
    of length 8), relative attention."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.pre_norm = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 16, 1, groups=4)
        self.parc_h = ParC2d(16, "H", 8)
        self.parc_w = ParC2d(16, "W", 8, groups=1)
        self.attn = RelAttention2d(16, head_dim=8, size=4)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.bn(self.conv(x))
        x = x + self.pw(self.pre_norm(x))
        x = self.parc_w(self.parc_h(x))
        x = x + self.attn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(x.mean((2, 3)))


def _toy():
    torch.manual_seed(0)
    m = Toy()
    with torch.no_grad():
        for bn in (m.bn, m.pre_norm):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    return m.train()


@pytest.mark.parametrize(
    "method, size",
    [("conv", (2, 3, 22, 30)), ("matmul", (1, 3, 26, 18)), ("fft", (1, 3, 18, 26))],
)
def test_parity_no_resize_bn_folded(tmp_path, method, size):
    m = _toy()
    path = export_onnx(m, tmp_path / "m.onnx", size, method=method)
    ops = onnx_op_types(path)
    assert "Resize" not in ops and "BatchNormalization" not in ops
    assert "Gather" not in ops and "GatherND" not in ops  # no run-time kernel resize / bias-table lookup
    assert ("DFT" in ops) == (method == "fft")
    assert ("Pad" in ops) == (method != "matmul")  # the dense ParC stays conv under "fft"
    res = verify_onnx(m, path, (3, *size[1:]), iters=2, warmup=1)  # another batch: the batch axis is dynamic
    assert res["rel_err"] <= 1e-4
    assert res["torch_ms"] > 0 and res["ort_ms"] > 0
    assert m.training


def test_export_does_not_modify_the_model_fixed_batch(tmp_path):
    m = _toy()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    path = export_onnx(m, tmp_path / "m.onnx", (1, 3, 20, 28), dynamic_batch=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [1, 3, 20, 28]
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert m.parc_h.base_size == 8 and m.parc_h.method == "auto" and isinstance(m.attn.rel_pos, RelPosBias2d)


def test_freeze_matches_the_model_at_its_resolution():
    m = _toy().double().eval()
    frozen = freeze_for_resolution(m, (1, 3, 22, 30), method="matmul")
    assert frozen.parc_h.base_size == 11 and frozen.parc_w.base_size == 15
    assert frozen.parc_h.method == "gemm" and isinstance(frozen.attn.rel_pos, FixedRelPosBias)
    x = torch.randn(2, 3, 22, 30, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), m(x), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="frozen for a 11x15 attention grid"):
        frozen.attn.rel_pos((5, 8))
    assert freeze_for_resolution(m, (1, 3, 22, 30), method="fft").parc_w.method == "direct"  # dense: conv form


@pytest.mark.slow
def test_timm_model_bn_folded_and_parity(tmp_path):
    import timm

    torch.manual_seed(0)
    m = timm.create_model("resnet18", num_classes=7)
    path = export_onnx(m, tmp_path / "r.onnx", (1, 3, 64, 96))
    assert "BatchNormalization" not in onnx_op_types(path)
    assert verify_onnx(m, path, (2, 3, 64, 96), iters=1, warmup=0)["rel_err"] <= 1e-4


def test_bad_inputs(tmp_path, monkeypatch):
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=3)
    with pytest.raises(ValueError, match=r"cannot take an input of shape \(1, 3, 40, 40\)"):
        export_onnx(vit, tmp_path / "v.onnx", (1, 3, 40, 40))
    with pytest.raises(ValueError, match="input_size"):
        export_onnx(_toy(), tmp_path / "t.onnx", (3, 32, 32))
    with pytest.raises(ValueError, match="method"):
        export_onnx(_toy(), tmp_path / "t.onnx", (1, 3, 32, 32), method="winograd")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # simulate the missing extra
    with pytest.raises(RuntimeError, match=r"hybridvision\[export\]"):
        export_onnx(_toy(), tmp_path / "t.onnx", (1, 3, 32, 32))


# --- the registered families -------------------------------------------------------------------------------------
# one small model per family (small depths/widths where the builder takes them), two resolutions each
SMALL_FAMILIES = {
    "coatnet": ("coatnet_pico", dict(depths=(2, 1, 1, 1, 1))),  # two stem convs: the stem's BatchNorm + GELU too
    "parc_convnext": ("parc_convnext_xt", dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 24), parc_where="all", img_size=64)),
    "parc_resnet": ("parc_resnet50", dict(layers=(1, 1, 1, 1), parc_where="all", img_size=64)),
    "parc_mobilenetv2": ("parc_mobilenetv2", dict(img_size=64)),
    "parc_net": ("parc_net_s", dict(img_size=64)),
}


def _family_model(family):
    import hybridvision as hv

    name, kw = SMALL_FAMILIES[family]
    torch.manual_seed(0)
    return hv.create_model(name, num_classes=10, **kw)


FULL_DEPTH = ("parc_mobilenetv2", "parc_net")  # no small variant: ~20-50 s per export, slow suite


@pytest.mark.parametrize(
    "family",
    [f for f in sorted(SMALL_FAMILIES) if f not in FULL_DEPTH] + [pytest.param(f, marks=pytest.mark.slow) for f in FULL_DEPTH],
)
@pytest.mark.parametrize("hw", [(64, 64), (96, 64)])
def test_family_parity_two_resolutions(tmp_path, family, hw):
    m = _family_model(family)
    path = export_onnx(m, tmp_path / "m.onnx", (1, 3, *hw))
    assert _resize_nodes(path) == []  # kernels / bias tables sized for 64 px: frozen for 96x64
    if family in ("coatnet", "parc_convnext"):  # Conv -> BN and pre-norm BN -> 1x1 Conv (shared default-init params)
        assert "BatchNormalization" not in onnx_op_types(path)
    assert verify_onnx(m, path, (2, 3, *hw), iters=1, warmup=0)["rel_err"] <= 1e-4


def _resize_nodes(path):
    """Nodes of the ONNX file that resize something: ``Resize`` ops, or nodes the exporter traced from an
    ``upsample``/``interpolate`` call (their name scope records the aten op they come from)."""
    import onnx

    found = []
    for node in onnx.load(str(path)).graph.node:
        scope = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "")
        if node.op_type == "Resize" or "upsample" in scope or "interpolate" in scope:
            found.append((node.op_type, scope))
    return found


def test_freezing_removes_the_kernel_resize(tmp_path):
    """At a size other than the kernels' base size the eager model interpolates its ParC kernels / PEs and the
    relative-bias tables; exported without the optimizer (no constant folding to hide it), the unfrozen model
    has that interpolation in the graph, the frozen one has none."""
    m = _toy().eval()
    x = torch.randn(1, 3, 22, 30)
    with torch.no_grad():
        torch.onnx.export(m, (x,), str(tmp_path / "raw.onnx"), dynamo=True, verbose=False, optimize=False)
        frozen = freeze_for_resolution(m, (1, 3, 22, 30))
        torch.onnx.export(frozen, (x,), str(tmp_path / "frozen.onnx"), dynamo=True, verbose=False, optimize=False)
    raw = _resize_nodes(tmp_path / "raw.onnx")
    assert any("parc_h" in s for _, s in raw) and any("rel_pos" in s for _, s in raw)
    assert _resize_nodes(tmp_path / "frozen.onnx") == []


def _all_models():
    import hybridvision as hv

    return hv.list_models()


@pytest.mark.slow
@pytest.mark.parametrize("name", _all_models())
def test_every_registered_model_default_and_other_resolution(tmp_path, name):
    import hybridvision as hv

    torch.manual_seed(0)
    m = hv.create_model(name)
    n_params = sum(p.numel() for p in m.parameters())
    if n_params > 300e6:
        pytest.skip(f"{name} has {n_params / 1e6:.0f}M parameters: beyond this machine's memory for export + copy")
    h, w = m.pretrained_cfg["input_size"][1:]
    other = {"coatnet_0": (288, 256), "parc_convnext_xt": (320, 256)}.get(name, (h + 64, w + 32) if h >= 128 else (h + 32, w))
    for size in ((h, w), other):
        path = export_onnx(m, tmp_path / f"{name}.onnx", (1, 3, *size))
        assert _resize_nodes(path) == []
        res = verify_onnx(m, path, (1, 3, *size), iters=1, warmup=0)
        assert res["rel_err"] <= 1e-4, (name, size, res)


# --- torch.compile (issue 7): every family, inference and a training step ----------------------------------------
def _compile_check(m, hw=(64, 64)):
    torch.manual_seed(1)
    x = torch.randn(2, 3, *hw)
    compiled = torch.compile(m.eval())
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-4, atol=1e-5)
    m.train()
    loss = F.cross_entropy(compiled(x), torch.tensor([1, 2]))
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in FULL_DEPTH else f
                                    for f in sorted(SMALL_FAMILIES)])
def test_dynamo_traces_without_graph_breaks(family):
    """One graph, no break, for inference (fused model, no_grad: the path of the eager oneDNN kernels and the bias
    cache) and for a training forward (the path of the eager-only autograd Functions): under torch.compile every
    such branch must take its plain form without asking something Dynamo cannot trace (a break also makes the
    resumed frames recompile per input shape, and inductor failed on the dynamic shapes that followed)."""
    torch._dynamo.reset()
    m = _family_model(family).eval()
    if hasattr(m, "fuse"):
        m.fuse()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        explain = torch._dynamo.explain(m)(x)
    assert explain.graph_break_count == 0, [str(r.reason)[:200] for r in explain.break_reasons]
    torch._dynamo.reset()
    m = _family_model(family).train()
    explain = torch._dynamo.explain(m)(x)
    assert explain.graph_break_count == 0, [str(r.reason)[:200] for r in explain.break_reasons]
    torch._dynamo.reset()


@pytest.mark.parametrize("direction", ["H", "W"])
def test_torch_compile_keeps_the_native_kernel(direction):
    """Under torch.compile ``auto`` still runs the native kernel, as one opaque op per call (its fake-tensor formula
    gives the shapes), in one graph; the compiled forward and every gradient equal eager."""
    from hybridvision.ops import ParC2d, native

    if not native.available():
        pytest.skip("native kernels not built here")
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = ParC2d(8, direction, 24)
    x = torch.randn(2, 8, 24, 20) if direction == "H" else torch.randn(2, 8, 20, 24)
    explain = torch._dynamo.explain(m)(x.requires_grad_())
    assert explain.graph_break_count == 0, explain.break_reasons
    ops = {str(n.target) for g in explain.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("autograd_function_apply" in o or "hybridvision" in o for o in ops), ops
    torch._dynamo.reset()
    y = m(x)
    ref = torch.autograd.grad(y.square().sum(), [x] + list(m.parameters()))
    yc = torch.compile(m)(x)
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(yc.square().sum(), [x] + list(m.parameters())), ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["coatnet", "parc_convnext"])
def test_torch_func_grad_matches_autograd(family):
    """Inside torch.func transforms the hand-written autograd Functions (oneDNN linear, SE, BatchNorm + GELU, the
    depthwise circular conv) step aside for plain ops (functorch rejects Functions without setup_context) and
    CoAtNet's stem skips its channels-last copy (vmap cannot make one): the functional gradients of the parameters
    and of the input, and vmap(grad)'s per-sample gradients, equal autograd's on the eager fast paths."""
    m = _family_model(family).eval()
    torch.manual_seed(2)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, inp):
        return F.cross_entropy(torch.func.functional_call(m, p, (inp,)), y)

    g_params, g_x = torch.func.grad(loss, argnums=(0, 1))(params, x)
    xr = x.clone().requires_grad_()
    ref = torch.autograd.grad(F.cross_entropy(m(xr), y), [xr] + list(m.parameters()))
    torch.testing.assert_close(g_x, ref[0], rtol=1e-4, atol=1e-6)
    for (name, _), r in zip(m.named_parameters(), ref[1:]):
        torch.testing.assert_close(g_params[name], r, rtol=1e-4, atol=1e-6, msg=name)
    # per-sample gradients, vmap(grad): sample 1's equal autograd on sample 1 alone
    per_sample = torch.func.vmap(torch.func.grad(lambda p, xi, yi: F.cross_entropy(
        torch.func.functional_call(m, p, (xi[None],)), yi[None])), in_dims=(None, 0, 0))(params, x, y)
    ref1 = torch.autograd.grad(F.cross_entropy(m(x[1:2]), y[1:2]), list(m.parameters()))
    for (name, _), r in zip(m.named_parameters(), ref1):
        torch.testing.assert_close(per_sample[name][1], r, rtol=1e-4, atol=1e-6, msg=name)


# --- hooks: the fast paths call every module that has hooks ----------------------------------------------------
class _PlainOps(TorchDispatchMode):
    """A pass-through dispatch mode: under it ``plain_eager()`` is False, so every fast path takes its plain form
    (each module called as itself), the reference for which hooks fire."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _run_hooked(m, x, train, plain):
    """Forward (and, when training, backward) of ``m`` with a forward hook on every named module that shifts the
    outputs of the leaves with parameters by 0.01, and a full backward hook on those leaves (not in models with
    in-place activations, which torch forbids after such a hook). Returns (names whose forward hook fired, names
    whose backward hook fired, output)."""
    fired, fired_back, handles = set(), set(), []
    back = train and not any(getattr(mod, "inplace", False) for mod in m.modules())
    for name, mod in m.named_modules():
        if not name:
            continue
        leaf = not list(mod.children()) and list(mod.parameters(recurse=False))

        def hook(mod, inp, out, name=name, leaf=leaf):
            fired.add(name)
            return out + 0.01 if leaf else None

        handles.append(mod.register_forward_hook(hook))
        if leaf and back:
            handles.append(mod.register_full_backward_hook(lambda mod, gi, go, name=name: fired_back.add(name)))
    torch.manual_seed(3)  # the same drop-path masks in both runs
    try:
        with torch.set_grad_enabled(train), (_PlainOps() if plain else contextlib.nullcontext()):
            y = m(x)
            if train:
                y.square().sum().backward()
    finally:
        for h in handles:
            h.remove()
    return fired, fired_back, y.detach()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # (the stem's input needs no gradient)
@pytest.mark.parametrize("family, mode", [(f, mode) for f in sorted(SMALL_FAMILIES) for mode in ("train", "eval")]
                         + [("coatnet", "fused")])
def test_hooks_fire_on_the_fast_paths(family, mode):
    """Forward hooks (here ones that change the output) and full backward hooks fire on the same modules, and the
    output is the same, on the eager fast paths (oneDNN kernels, BatchNorm + GELU kernel, SE Function, chained
    Transformer MLP) as on the plain module calls: tools built on hooks (torchinfo, thop, timm's FeatureHooks,
    Grad-CAM on inner layers) see every module."""
    m = _family_model(family).train(mode == "train")
    if mode == "fused":
        m.fuse()
    x = torch.randn(2, 3, 64, 64)
    state = copy.deepcopy(m.state_dict())  # (BatchNorm statistics: both runs start from the same)
    fast = _run_hooked(m, x, mode == "train", plain=False)
    m.load_state_dict(state)
    plain = _run_hooked(m, x, mode == "train", plain=True)
    assert fast[0] == plain[0], sorted(fast[0] ^ plain[0])
    assert fast[1] == plain[1], sorted(fast[1] ^ plain[1])
    torch.testing.assert_close(fast[2], plain[2], rtol=1e-4, atol=1e-4)
    if family == "coatnet":  # where the fast paths are: inner modules' hooks are among those that fired
        assert {"stages.0.blocks.0.se.fc1", "stages.2.blocks.0.attn.qkv", "stages.2.blocks.0.mlp.fc2"} <= fast[0]


@pytest.mark.parametrize("family", [f for f in sorted(SMALL_FAMILIES) if f not in FULL_DEPTH])
def test_double_backward_gradient_penalty(family):
    """A training step with an input-gradient penalty (``create_graph=True``, then backward through the gradient)
    works on the eager fast paths (hand-written autograd Functions: oneDNN linear, SE, BatchNorm + GELU, the
    depthwise circular conv) and gives the parameter gradients of the all-plain model (plain module calls, the
    circular conv's "direct" method)."""
    from hybridvision.ops import circular

    m = _family_model(family).train()
    state = copy.deepcopy(m.state_dict())
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])

    def step(plain):
        m.load_state_dict(state)
        m.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        torch.manual_seed(3)  # the same drop-path masks
        with (_PlainOps() if plain else contextlib.nullcontext()):
            loss = F.cross_entropy(m(xr), y)
            (gx,) = torch.autograd.grad(loss, xr, create_graph=True)
            (loss + 10 * gx.square().sum()).backward()
        return [p.grad for p in m.parameters()]

    fast = step(plain=False)
    before = circular.set_default_method("direct")
    try:
        plain = step(plain=True)
    finally:
        circular.set_default_method(before)
    for (name, _), a, b in zip(m.named_parameters(), fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


def test_pruned_model_trains_through_the_fast_paths():
    """``torch.nn.utils.prune`` recomputes ``weight`` from ``weight_orig`` in a forward pre-hook: after an optimizer
    step the fast paths must call the pruned modules (oneDNN linear in training, SE FCs, oneDNN conv + GELU in
    eval) so the forward uses the current masked weights, as the plain path does."""
    import torch.nn.utils.prune as prune
    m = _family_model("coatnet")
    block, tblock = m.stages[0].blocks[0], m.stages[2].blocks[0]
    for mod in (tblock.attn.qkv, tblock.mlp.fc1, block.se.fc1, block.conv1):
        prune.l1_unstructured(mod, "weight", amount=0.5)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(2, 3, 64, 64)
    for _ in range(2):  # weight_orig moves; the masked weight must follow
        opt.zero_grad()
        F.cross_entropy(m.train()(x), torch.tensor([1, 2])).backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        fast = m(x)
        with _PlainOps():
            plain = m(x)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    assert (tblock.attn.qkv.weight == 0).float().mean() >= 0.5


def test_global_hooks_see_every_call_and_fuse_keeps_hooks():
    """A global forward hook (``register_module_forward_hook``) sees the same calls as on the plain path; ``fuse()``
    refuses to fold a BatchNorm that has hooks (they would stop firing) and names it."""
    m = _family_model("coatnet").eval()
    x = torch.randn(1, 3, 64, 64)
    calls = []
    h = torch.nn.modules.module.register_module_forward_hook(lambda mod, i, o: calls.append(type(mod).__name__))
    try:
        with torch.no_grad():
            m(x)
            fast, calls[:] = list(calls), []
            with _PlainOps():
                m(x)
    finally:
        h.remove()
    assert fast == calls and "SqueezeExcite" in fast
    h = m.stages[0].blocks[0].bn1.register_forward_hook(lambda *a: None)
    m.stem.norms[0].register_forward_pre_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match=r"\['stem\.norms\.0', 'stages\.0\.blocks\.0\.bn1'\].*hooks"):
        m.fuse()
    assert isinstance(m.stem.norms[0], nn.BatchNorm2d) and not m.stem.fused  # nothing folded
    h.remove()
    block = m.stages[0].blocks[0]
    block.bn2.register_forward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match=r"\['bn2'\].*hooks"):  # a block's own fuse() checks too
        block.fuse()


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(SMALL_FAMILIES))
def test_torch_compile_every_family(family):
    torch._dynamo.reset()
    _compile_check(_family_model(family))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["direct", "gemm", "fft"])
def test_torch_compile_parc_methods(method):
    """Each method compiles into one graph (no graph break) for inference, and the compiled training step runs:
    under torch.compile the circular conv is plain torch ops (the FFT autograd Function's compiled backward failed
    in inductor, "stride(-1) must be 1 to view ComplexFloat as Float")."""
    import hybridvision as hv

    torch._dynamo.reset()
    torch.manual_seed(0)
    name, kw = SMALL_FAMILIES["parc_convnext"]
    m = hv.create_model(name, num_classes=10, **{**kw, "parc_method": method})
    explain = torch._dynamo.explain(m.eval())(torch.randn(2, 3, 64, 64))
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    _compile_check(m)


def test_cli_export_verify(tmp_path, capsys):
    from hybridvision.cli import main

    out = tmp_path / "m.onnx"
    assert main(["export", "--model", "timm:resnet10t", "--img-size", "32", "48", "--output", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert out.exists() and "relative error" in text and "onnxruntime" in text
    rel = float(text.split("relative error ")[1].split()[0])
    assert rel <= 1e-4
    assert main(["export", "--model", "timm:resnet10t", "--img-size", "32", "48", "64", "--output", str(out)]) == 1
    assert "H or H W" in capsys.readouterr().err
