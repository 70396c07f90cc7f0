"""The fused forward-mode BatchNorm rule equals PyTorch's built-in one (float64)."""

import pytest
import torch
from torch.autograd import forward_ad as fwAD

from l2w_dist.meta.forward_mode import FusedBatchNormJVP


class _PassThrough(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _jvp(bn: torch.nn.Module, x, x_t, tangents, fused: bool):
    buffers = {n: b.clone() for n, b in bn.named_buffers()}
    params = {n: p.detach() for n, p in bn.named_parameters()}
    mode = FusedBatchNormJVP() if fused else _PassThrough()
    with fwAD.dual_level(), mode:
        duals = {n: fwAD.make_dual(p, tangents[n]) if n in tangents else p for n, p in params.items()}
        inp = fwAD.make_dual(x, x_t) if x_t is not None else x
        out = torch.func.functional_call(bn, (duals, buffers), (inp,))
        primal, tangent = fwAD.unpack_dual(out)
        return primal.clone(), None if tangent is None else tangent.clone(), buffers


@pytest.mark.parametrize(
    "affine,track,train,input_tangent,param_tangents",
    [
        (True, True, True, True, ("weight", "bias")),
        (True, True, True, False, ("weight", "bias")),
        (True, True, True, True, ("weight",)),
        (True, True, True, True, ("bias",)),
        (True, True, True, True, ()),
        (False, True, True, True, ()),
        (True, False, True, True, ("weight", "bias")),
        (True, True, False, True, ("weight", "bias")),  # eval mode: PyTorch's own rule
    ],
)
def test_fused_batch_norm_jvp_equals_builtin(affine, track, train, input_tangent, param_tangents, monkeypatch):
    import l2w_dist.meta.forward_mode as fm

    used = []
    rule = fm._batch_norm_jvp
    monkeypatch.setattr(fm, "_batch_norm_jvp", lambda *a, **k: used.append(rule(*a, **k)) or used[-1])
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(5, affine=affine, track_running_stats=track).double().train(train)
    if track:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    if affine:
        with torch.no_grad():
            bn.weight.normal_()
            bn.bias.normal_()
    x = torch.randn(6, 5, 4, 3, dtype=torch.float64) * 3 + 1
    x_t = torch.randn_like(x) if input_tangent else None
    tangents = {n: torch.randn(5, dtype=torch.float64) for n in param_tangents}
    p0, t0, b0 = _jvp(bn, x, x_t, tangents, fused=False)
    p1, t1, b1 = _jvp(bn, x, x_t, tangents, fused=True)
    torch.testing.assert_close(p1, p0, rtol=1e-12, atol=1e-12)
    if t0 is None:
        assert t1 is None
    else:
        assert t1 is not None and t1.dtype == p1.dtype
        torch.testing.assert_close(t1, t0, rtol=1e-10, atol=1e-10)
    fused_expected = train and (input_tangent or param_tangents)
    assert [u is not None for u in used] == [bool(fused_expected)]
    for name in b0:  # running statistics updated as F.batch_norm updates them
        torch.testing.assert_close(b1[name], b0[name], rtol=1e-12, atol=1e-12)


def test_fused_batch_norm_jvp_bf16_channels_last_keeps_dtype_and_format():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(8)
    x = torch.randn(4, 8, 5, 5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x_t = torch.randn_like(x)
    tangents = {"weight": torch.randn(8), "bias": torch.randn(8)}
    _, t0, _ = _jvp(bn, x, x_t, tangents, fused=False)
    _, t1, _ = _jvp(bn, x, x_t, tangents, fused=True)
    assert t1.dtype == torch.bfloat16 and t1.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(t1.float(), t0.float(), rtol=3e-2, atol=6e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("dtype,fmt", [(torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last)])
def test_fused_batch_norm_jvp_cuda(dtype, fmt):
    """The CUDA kernels (mixed bf16 input / fp32 statistics) agree with PyTorch's rule."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(16).cuda()
    x = torch.randn(8, 16, 7, 7, device="cuda").to(dtype).contiguous(memory_format=fmt)
    x_t = torch.randn_like(x)
    tangents = {"weight": torch.randn(16, device="cuda"), "bias": torch.randn(16, device="cuda")}
    p0, t0, _ = _jvp(bn, x, x_t, tangents, fused=False)
    p1, t1, _ = _jvp(bn, x, x_t, tangents, fused=True)
    assert t1.dtype == dtype and t1.is_contiguous(memory_format=fmt)
    tol = dict(rtol=3e-2, atol=6e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(p1.float(), p0.float(), **tol)
    torch.testing.assert_close(t1.float(), t0.float(), **tol)


def test_the_first_jvp_prints_no_torch_jit_deprecation_warning():
    """torch's forward-AD decompositions (imported at the first jvp) use the deprecated
    torch.jit.script; l2w_dist imports them quietly, so an L2W run does not print that warning."""
    import subprocess
    import sys

    code = (
        "import warnings, torch\n"
        "import l2w_dist.meta\n"
        "from torch.func import jvp\n"
        "warnings.simplefilter('error')\n"
        "x, t = torch.randn(4, 3), torch.randn(4, 3)\n"
        "y = torch.tensor([0, 1, 2, 0])\n"
        "jvp(lambda a: torch.nn.functional.cross_entropy(a, y), (x,), (t,))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
