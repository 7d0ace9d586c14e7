"""Kernel-backed replacements for mlx-lm's 1- and 2-bit `nn.QuantizedLinear` layers.

`install_kernels(model)` swaps modules in place when Metal is available and
LIEQ_NO_KERNELS is unset:

- the q, k and v projections of an attention layer that share bits, group size and input
  width become `FusedQKVProjection`s. The first of the three calls computes all three in
  one kernel dispatch, and the other two return the stored results;
- a SwiGLU MLP from mlx-lm (llama, qwen2, qwen3) whose gate and up projections share bits
  and group size, and carry no bias, becomes a `FusedSwiGLUMLP`;
- every other 1- or 2-bit affine `nn.QuantizedLinear` becomes a `KernelQuantizedLinear`.

The replacements keep the parameter names (`weight`, `scales`, `biases`, `bias`) and the
module paths, so saved weights stay interchangeable. Where the kernels do not run (no
Metal, or inputs of more than 8 rows) they compute with `mx.quantized_matmul`, and their
results then equal the stock layers' results exactly. On Metal they match
`mx.quantized_matmul` within `lieq_mlx.kernels.KERNEL_TOLERANCE`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from lieq_mlx.kernels import (
    KERNEL_BITS,
    KERNEL_GROUP_SIZES,
    NO_KERNELS_ENV,
    PackedWeight,
    fused_gate_up,
    fused_qkv,
    kernels_disabled_by_env,
    quantized_matvec,
)
from lieq_mlx.platform import metal_available

# mlx-lm modules whose `MLP.__call__` is down_proj(swiglu(gate_proj(x), up_proj(x))).
SWIGLU_MLP_MODULES = ("llama", "qwen2", "qwen3")


def _swiglu_mlp_classes() -> tuple[type, ...]:
    classes = []
    for module_name in SWIGLU_MLP_MODULES:
        try:
            module = importlib.import_module(f"mlx_lm.models.{module_name}")
        except ImportError:
            continue
        mlp_class = getattr(module, "MLP", None)
        if isinstance(mlp_class, type):
            classes.append(mlp_class)
    return tuple(classes)


def kernel_eligible(layer: object) -> bool:
    """Return True for an affine `nn.QuantizedLinear` at 1 or 2 bits with a kernel group size."""
    return (
        isinstance(layer, nn.QuantizedLinear)
        and getattr(layer, "mode", "affine") == "affine"
        and layer.bits in KERNEL_BITS
        and layer.group_size in KERNEL_GROUP_SIZES
        and layer.get("biases") is not None
    )


def _packed(layer: nn.Module) -> PackedWeight:
    return PackedWeight(layer["weight"], layer["scales"], layer["biases"])


def _input_dims(layer: nn.Module) -> int:
    return int(layer["weight"].shape[1]) * 32 // int(layer.bits)


class KernelQuantizedLinear(nn.Module):
    """A 1- or 2-bit `nn.QuantizedLinear` computed by the custom matrix-vector kernel."""

    def __init__(self, layer: nn.QuantizedLinear, use_metal: bool) -> None:
        super().__init__()
        self.group_size = layer.group_size
        self.bits = layer.bits
        self.mode = "affine"
        self.use_metal = use_metal
        self.weight = layer["weight"]
        self.scales = layer["scales"]
        self.biases = layer["biases"]
        if "bias" in layer:
            self.bias = layer["bias"]
        self.freeze()

    def _extra_repr(self) -> str:
        path = "metal kernel" if self.use_metal else "mx.quantized_matmul"
        return (
            f"input_dims={_input_dims(self)}, output_dims={self.weight.shape[0]}, "
            f"bias={'bias' in self}, group_size={self.group_size}, bits={self.bits}, "
            f"path={path}"
        )

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matvec(
            x,
            self["weight"],
            self["scales"],
            self["biases"],
            group_size=self.group_size,
            bits=self.bits,
            use_metal=self.use_metal,
        )
        if "bias" in self:
            y = y + self["bias"]
        return y


class QKVGroup:
    """Shared state of the three fused projections of one attention layer.

    The first projection called with an input computes q, k and v in one dispatch and
    stores the two it did not return. A sibling called next with the same array object
    takes its stored result, so mlx-lm's `q_proj(x), k_proj(x), v_proj(x)` costs one
    dispatch. Any other call order or input recomputes, which is slower but still correct.
    NOTE: the stored results assume one thread runs the model at a time.
    """

    def __init__(self, group_size: int, bits: int, use_metal: bool) -> None:
        self.group_size = group_size
        self.bits = bits
        self.use_metal = use_metal
        self.members: dict[str, FusedQKVProjection] = {}
        self._input: mx.array | None = None
        self._pending: dict[str, mx.array] = {}

    def project(self, role: str, x: mx.array) -> mx.array:
        """Return the `role` ("q", "k" or "v") projection of x, without the layer bias."""
        if self._input is x and role in self._pending:
            result = self._pending.pop(role)
            if not self._pending:
                self._input = None
            return result

        q, k, v = fused_qkv(
            x,
            _packed(self.members["q"]),
            _packed(self.members["k"]),
            _packed(self.members["v"]),
            group_size=self.group_size,
            bits=self.bits,
            use_metal=self.use_metal,
        )
        outputs = {"q": q, "k": k, "v": v}
        result = outputs.pop(role)
        self._input = x
        self._pending = outputs
        return result


class FusedQKVProjection(KernelQuantizedLinear):
    """One of q_proj, k_proj, v_proj, computed together with its siblings in one dispatch."""

    def __init__(self, layer: nn.QuantizedLinear, group: QKVGroup, role: str) -> None:
        super().__init__(layer, group.use_metal)
        # Stored outside the module tree so the group is not treated as a child module.
        object.__setattr__(self, "_group", group)
        self.role = role
        group.members[role] = self

    def _extra_repr(self) -> str:
        return f"fused {self.role} of q/k/v, " + super()._extra_repr()

    def __call__(self, x: mx.array) -> mx.array:
        y = self._group.project(self.role, x)
        if "bias" in self:
            y = y + self["bias"]
        return y


class FusedSwiGLUMLP(nn.Module):
    """A SwiGLU MLP whose gate and up projections and silu(gate) * up run as one kernel."""

    def __init__(self, mlp: nn.Module, use_metal: bool) -> None:
        super().__init__()
        self.use_metal = use_metal
        self.gate_proj = mlp.gate_proj
        self.up_proj = mlp.up_proj
        down = mlp.down_proj
        self.down_proj = KernelQuantizedLinear(down, use_metal) if kernel_eligible(down) else down

    def __call__(self, x: mx.array) -> mx.array:
        hidden = fused_gate_up(
            x,
            _packed(self.gate_proj),
            _packed(self.up_proj),
            group_size=self.gate_proj.group_size,
            bits=self.gate_proj.bits,
            use_metal=self.use_metal,
        )
        return self.down_proj(hidden)


@dataclass
class KernelReport:
    """Summary of the modules `install_kernels` replaced and of the path they compute on."""

    installed: bool
    on_metal: bool
    reason: str
    fused_qkv: int = 0
    fused_gate_up: int = 0
    single_linear: int = 0
    other_quantized: int = 0
    paths: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Return a one-line status for `lieq-mlx env` and the chat header."""
        if not self.installed:
            return f"off ({self.reason})"
        counts = (
            f"{self.fused_qkv} fused q/k/v, {self.fused_gate_up} fused gate/up, "
            f"{self.single_linear} single 1-2 bit layers"
        )
        if self.on_metal:
            return f"on ({counts})"
        return f"fallback: mx.quantized_matmul in kernel modules ({counts}; {self.reason})"


def _fusable_qkv(module: nn.Module) -> bool:
    names = ("q_proj", "k_proj", "v_proj")
    if not all(name in module for name in names):
        return False
    layers = [module[name] for name in names]
    if not all(kernel_eligible(layer) for layer in layers):
        return False
    first = layers[0]
    return all(
        layer.bits == first.bits
        and layer.group_size == first.group_size
        and _input_dims(layer) == _input_dims(first)
        for layer in layers
    )


def _fusable_mlp(module: nn.Module, mlp_classes: tuple[type, ...]) -> bool:
    if not isinstance(module, mlp_classes):
        return False
    gate, up = module.get("gate_proj"), module.get("up_proj")
    if not (kernel_eligible(gate) and kernel_eligible(up)):
        return False
    return (
        gate.bits == up.bits
        and gate.group_size == up.group_size
        and "bias" not in gate
        and "bias" not in up
        and gate["weight"].shape == up["weight"].shape
    )


def _child_slots(module: nn.Module) -> list[tuple[str, object, object]]:
    """List (path suffix, container, key) for each direct child module of `module`."""
    slots: list[tuple[str, object, object]] = []
    for name, child in module.children().items():
        if isinstance(child, nn.Module):
            slots.append((name, module, name))
        elif isinstance(child, list):
            # children() builds new lists, so replace items in the list the module stores.
            stored = module[name]
            for index, item in enumerate(stored):
                if isinstance(item, nn.Module):
                    slots.append((f"{name}.{index}", stored, index))
    return slots


def _replace(container: object, key: object, new: nn.Module) -> None:
    if isinstance(container, list):
        container[key] = new
    else:
        setattr(container, key, new)


def install_kernels(model: nn.Module, *, force: bool = False) -> KernelReport:
    """Replace the 1- and 2-bit quantized layers of `model` with kernel modules, in place.

    Does nothing when LIEQ_NO_KERNELS is set. Without Metal it also does nothing unless
    `force` is True, which installs the modules on their `mx.quantized_matmul` path (used by
    tests to run the module code on machines without a GPU). Returns what was replaced.
    """
    if kernels_disabled_by_env():
        return KernelReport(False, False, f"turned off by {NO_KERNELS_ENV}")
    on_metal = metal_available()
    if not on_metal and not force:
        return KernelReport(False, False, "Metal not available; using mx.quantized_matmul")

    reason = "Metal GPU" if on_metal else "no Metal; modules installed with force=True"
    report = KernelReport(True, on_metal, reason)
    mlp_classes = _swiglu_mlp_classes()

    # Walk a snapshot with paths, since the loop replaces modules as it goes.
    pending: list[tuple[str, nn.Module]] = [("", model)]
    while pending:
        path, module = pending.pop(0)
        if _fusable_qkv(module):
            first = module["q_proj"]
            group = QKVGroup(first.group_size, first.bits, on_metal)
            for role in ("q", "k", "v"):
                name = f"{role}_proj"
                setattr(module, name, FusedQKVProjection(module[name], group, role))
            report.fused_qkv += 1
            report.paths.append(f"{path}q_proj+k_proj+v_proj")

        for suffix, container, key in _child_slots(module):
            child = container[key]
            child_path = f"{path}{suffix}"
            if isinstance(child, (KernelQuantizedLinear, FusedSwiGLUMLP)):
                continue
            if _fusable_mlp(child, mlp_classes):
                fused = FusedSwiGLUMLP(child, on_metal)
                _replace(container, key, fused)
                report.fused_gate_up += 1
                report.paths.append(f"{child_path}.gate_proj+up_proj")
                if isinstance(fused.down_proj, KernelQuantizedLinear):
                    report.single_linear += 1
                    report.paths.append(f"{child_path}.down_proj")
            elif kernel_eligible(child):
                _replace(container, key, KernelQuantizedLinear(child, on_metal))
                report.single_linear += 1
                report.paths.append(child_path)
            elif isinstance(child, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                report.other_quantized += 1
            else:
                pending.append((f"{child_path}.", child))
    return report


def _kernel_modules(model: nn.Module) -> list[nn.Module]:
    kinds = (KernelQuantizedLinear, FusedSwiGLUMLP)
    return [module for _, module in model.named_modules() if isinstance(module, kinds)]


def kernels_active(model: nn.Module | None = None) -> bool:
    """Return True when custom Metal kernels compute (some of) `model`'s layers.

    With no model, return whether they would run on this machine: Metal available and
    LIEQ_NO_KERNELS unset.
    """
    if kernels_disabled_by_env() or not metal_available():
        return False
    if model is None:
        return True
    return any(module.use_metal for module in _kernel_modules(model))


def kernels_status(model: nn.Module | None = None) -> str:
    """Return a one-line kernel status for `lieq-mlx env` and the chat header."""
    if kernels_disabled_by_env():
        return f"off (turned off by {NO_KERNELS_ENV})"
    if not metal_available():
        installed = model is not None and bool(_kernel_modules(model))
        if installed:
            return "fallback (kernel modules installed, running mx.quantized_matmul: no Metal)"
        return "off (Metal not available; using mx.quantized_matmul)"
    if model is None:
        return "available (Metal GPU; 1- and 2-bit layers use custom kernels once installed)"
    modules = _kernel_modules(model)
    if not modules:
        return "off (no kernel modules installed in this model)"
    fused_mlp = sum(isinstance(module, FusedSwiGLUMLP) for module in modules)
    fused_qkv = sum(isinstance(module, FusedQKVProjection) for module in modules) // 3
    single = sum(
        isinstance(module, KernelQuantizedLinear) and not isinstance(module, FusedQKVProjection)
        for module in modules
    )
    return f"on ({fused_qkv} fused q/k/v, {fused_mlp} fused gate/up, {single} single layers)"
