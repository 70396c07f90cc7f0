"""A fused forward-mode rule for train-mode BatchNorm, used by the ``jvp`` engine.

PyTorch's built-in forward-AD formula for ``batch_norm`` (``batch_norm_jvp``) is a
composite of about a dozen full-size elementwise ops and two reductions, and under bf16
autocast every one of them runs in float32 (the saved mean / inverse std are float32, so
type promotion lifts each full-size intermediate). On a BatchNorm-heavy network such as
MSDNet (110-186 BatchNorms) this, not the convolutions, dominates the JVP forward, and
it is why the JVP gained nothing from bf16 (measurements: docs/benchmarks/meta.md).

The fused rule uses that the Jacobian of ``x -> (x - mean(x)) / std(x)`` (per channel,
batch statistics) is symmetric, so its JVP equals its VJP: with x̂ = (x - μ)·σ⁻¹,

    ẏ = γ·σ⁻¹·(ẋ - mean(ẋ) - x̂·mean(ẋ·x̂)) + γ̇·x̂ + β̇
      = native_batch_norm_backward(grad_out=ẋ)[input]  +  batch_norm_eval(x; μ, σ, γ̇, β̇),

two fused kernels (the same ones training uses, in the input's dtype and memory format)
plus one add. It is exact (same formula), so results equal the built-in rule up to
rounding. Eval-mode BatchNorm and every other op keep PyTorch's own rules.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad as fwAD
from torch.overrides import TorchFunctionMode

# torch's forward-AD decompositions compile themselves with the deprecated torch.jit.script when
# first imported (at the first jvp), which printed a FutureWarning in every L2W run; import them
# here with that one warning silenced (torch's own code, nothing the user can act on).
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    try:
        import torch._decomp.decompositions_for_jvp  # noqa: F401
    except ImportError:  # a torch without the module: nothing to silence
        pass


class FusedBatchNormJVP(TorchFunctionMode):
    """Inside ``fwAD.dual_level()``: route train-mode ``F.batch_norm`` on dual tensors to the fused rule."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            out = _batch_norm_jvp(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _batch_norm_jvp(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor | None:
    """The dual output of a train-mode batch norm, or None to use PyTorch's own rule."""
    uses_batch_stats = training or running_mean is None or running_var is None
    if not uses_batch_stats:
        return None
    x, x_t = fwAD.unpack_dual(input)
    w, w_t = fwAD.unpack_dual(weight) if weight is not None else (None, None)
    b, b_t = fwAD.unpack_dual(bias) if bias is not None else (None, None)
    if x_t is None and w_t is None and b_t is None:
        return None  # nothing to differentiate: the plain op
    F._verify_batch_size(x.size())
    # The primal, with the running-statistics update F.batch_norm would do (scratch buffers).
    out, mean, invstd = torch.ops.aten.native_batch_norm(x, w, b, running_mean, running_var, True, momentum, eps)
    tangent = None
    if x_t is not None:  # γ·σ⁻¹·(ẋ - mean(ẋ) - x̂·mean(ẋ·x̂)): the input-gradient of batch norm at grad_out=ẋ
        x_t = x_t.to(x.dtype)
        tangent = torch.ops.aten.native_batch_norm_backward(
            x_t, x, w, running_mean, running_var, mean, invstd, True, eps, [True, False, False]
        )[0]
    if w_t is not None or b_t is not None:  # γ̇·x̂ + β̇: an eval-mode batch norm with the batch statistics
        zeros = torch.zeros_like(mean)
        var = invstd.pow(-2) - eps
        affine_t = F.batch_norm(
            x, mean, var, w_t if w_t is not None else zeros, b_t if b_t is not None else zeros, False, 0.0, eps
        )
        tangent = affine_t if tangent is None else tangent + affine_t
    return fwAD.make_dual(out, tangent)
