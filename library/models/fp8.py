"""`--fp8_base` / `--fp8_base_unet`: frozen Linear/Conv2d weights held in float8 (e4m3), upcast one layer at a time.

sd-scripts casts the whole U-Net to float8 and lets autocast upcast each weight as an op reads it; the upcast
copy is then kept by autograd for the backward pass of every layer the LoRA's gradient flows through, so the
saving shrinks to what gradient checkpointing recomputes. Here each converted layer runs through an autograd
function that saves the float8 weight itself and upcasts it again in backward: at any moment only the layer
being computed has a wide copy, so the base weights take 1 byte per element for the whole step. The numbers are
sd-scripts': the weight is rounded to e4m3 once, then computed in the mixed-precision dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn


class _LinearFromFp8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight8: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        ctx.save_for_backward(weight8)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return F.linear(x, weight8.to(dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight8,) = ctx.saved_tensors
        grad_x = grad.matmul(weight8.to(ctx.dtype).to(grad.dtype)) if ctx.needs_input_grad[0] else None
        return (None if grad_x is None else grad_x.to(ctx.x_dtype)), None, None, None


class _Conv2dFromFp8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight8: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                geometry: tuple):
        ctx.save_for_backward(weight8)
        ctx.dtype, ctx.x_dtype, ctx.x_shape, ctx.geometry = dtype, x.dtype, x.shape, geometry
        return F.conv2d(x, weight8.to(dtype), bias, *geometry)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight8,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = weight8.to(ctx.dtype).to(grad.dtype)
            grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, weight, grad, *ctx.geometry).to(ctx.x_dtype)
        return grad_x, None, None, None, None


class Fp8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is stored in float8 and computed in `compute_dtype`."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the input joins the compute dtype as autocast would cast it (sampling may run without autocast)
        return _LinearFromFp8.apply(x.to(self.compute_dtype), self.weight, self.bias, self.compute_dtype)


class Fp8Conv2d(nn.Conv2d):
    """A frozen nn.Conv2d whose weight is stored in float8 and computed in `compute_dtype`."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        geometry = (self.stride, self.padding, self.dilation, self.groups)
        return _Conv2dFromFp8.apply(x.to(self.compute_dtype), self.weight, self.bias, self.compute_dtype, geometry)


def _convertible(layer: nn.Module) -> type[nn.Module] | None:
    if type(layer) is nn.Linear:
        return Fp8Linear
    if type(layer) is nn.Conv2d and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        return Fp8Conv2d
    return None


def store_in_fp8(module: nn.Module, compute_dtype: torch.dtype) -> int:
    """Convert every plain Linear/Conv2d of a frozen module in place; returns how many layers were converted.

    Call before a LoRA hooks the layers (it wraps the layer's forward as it finds it).
    """
    count = 0
    for layer in module.modules():
        cls = _convertible(layer)
        if cls is None:
            continue
        layer.weight = nn.Parameter(layer.weight.detach().to(FP8), requires_grad=False)
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach().to(compute_dtype), requires_grad=False)
        layer.__class__ = cls
        layer.compute_dtype = compute_dtype
        count += 1
    return count
