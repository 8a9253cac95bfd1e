"""Model adapters, written as data: where the layers, MLP and attention of an architecture live.

The registry is keyed by the ``architectures[0]`` entry of a model's config. An unknown
architecture fails before any work, listing the supported ones. Models are never recognised
by a substring of their name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where modules are changed, so the registry loads without it
    import torch
    from torch import nn


@dataclass(frozen=True)
class Adapter:
    layers: str  # dotted path from the model to the ModuleList of blocks
    mlp: str  # MLP module, relative to a block
    down: str  # down projection (input = act(gate) * up), relative to the MLP
    act: str  # activation, relative to the MLP (hooked only when unfused)
    gate: str | None = None  # separate gate projection, relative to the MLP
    up: str | None = None  # separate up projection, relative to the MLP
    gate_up: str | None = None  # fused [gate; up] projection (first half gate, second half up)
    attn: str = "self_attn"  # attention module, relative to a block
    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    qkv: str | None = None  # fused [q; k; v] projection
    o: str = "o_proj"
    n_heads_attr: str = "num_attention_heads"  # config attribute of the number of attention heads
    seq_first: bool = False  # hidden states inside the blocks are (seq, batch, hidden)

    @property
    def fused(self) -> bool:
        return self.gate_up is not None


_LLAMA = Adapter(layers="model.layers", mlp="mlp", gate="gate_proj", up="up_proj", down="down_proj", act="act_fn")
_PHI3 = Adapter(
    layers="model.layers",
    mlp="mlp",
    gate_up="gate_up_proj",
    down="down_proj",
    act="activation_fn",
    q=None,
    k=None,
    v=None,
    qkv="qkv_proj",
)
_GLM4 = Adapter(layers="model.layers", mlp="mlp", gate_up="gate_up_proj", down="down_proj", act="activation_fn")
_CHATGLM = Adapter(
    layers="transformer.encoder.layers",
    mlp="mlp",
    gate_up="dense_h_to_4h",
    down="dense_4h_to_h",
    act="activation_func",
    attn="self_attention",
    q=None,
    k=None,
    v=None,
    qkv="query_key_value",
    o="dense",
    seq_first=True,
)

REGISTRY: dict[str, Adapter] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    # q_norm/k_norm act on head_dim and are shared by the heads: pruning heads leaves them whole
    "Qwen3ForCausalLM": _LLAMA,
    # GeGLU (act_fn is gelu_pytorch_tanh on the gate) and four norms a block; down_proj's output
    # passes post_feedforward_layernorm before the residual (see fnprune.baselines on _bias)
    "Gemma3ForCausalLM": _LLAMA,
    "Phi3ForCausalLM": _PHI3,
    "Glm4ForCausalLM": _GLM4,
    "ChatGLMModel": _CHATGLM,
    "ChatGLMForConditionalGeneration": _CHATGLM,
}


def supports_head_pruning(architecture: str) -> bool:
    """FLAP's head pruning needs separate q/k/v projections (fused qkv models: MLP-only methods)."""
    return REGISTRY[architecture].qkv is None


def architecture_of(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise ValueError(
            f"model config of type {type(config).__name__} names no architectures; "
            f"expected one of: {', '.join(sorted(REGISTRY))}"
        )
    return archs[0]


def get_adapter(architecture: str) -> Adapter:
    try:
        return REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(sorted(REGISTRY))}"
        ) from None


def adapter_for(model: nn.Module) -> Adapter:
    return get_adapter(architecture_of(model.config))


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


def layers(model: nn.Module, ad: Adapter | None = None) -> nn.ModuleList:
    return _get(model, (ad or adapter_for(model)).layers)


def mlp_of(block: nn.Module, ad: Adapter) -> nn.Module:
    return _get(block, ad.mlp)


def attn_of(block: nn.Module, ad: Adapter) -> nn.Module:
    return _get(block, ad.attn)


def batch_first(t: torch.Tensor, ad: Adapter) -> torch.Tensor:
    """A block's activation as (batch, seq, ...), whatever order the architecture keeps."""
    return t.transpose(0, 1) if ad.seq_first else t


def intermediate_size(block: nn.Module, ad: Adapter) -> int:
    return _get(mlp_of(block, ad), ad.down).in_features


def mlp_linears(block: nn.Module, ad: Adapter) -> dict[str, nn.Linear]:
    mlp = mlp_of(block, ad)
    names = {"down": ad.down}
    if ad.fused:
        names["gate_up"] = ad.gate_up
    else:
        names.update(gate=ad.gate, up=ad.up)
    return {k: _get(mlp, v) for k, v in names.items()}


def block_parameter_count(model: nn.Module) -> int:
    """Parameters of all transformer blocks (attention + MLP + norms), as FLAP counts them."""
    return sum(p.numel() for p in layers(model).parameters())


def mlp_neuron_params(block: nn.Module, ad: Adapter) -> int:
    """Parameters one MLP neuron owns: its gate and up rows and its down column (+ biases)."""
    lin = mlp_linears(block, ad)
    hidden = lin["down"].out_features
    n = 3 * hidden
    if ad.fused:
        n += 2 * int(lin["gate_up"].bias is not None)
    else:
        n += int(lin["gate"].bias is not None) + int(lin["up"].bias is not None)
    return n


def _sliced_linear(
    lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None, bias: bool | None = None
) -> nn.Linear:
    from torch import nn

    w = lin.weight.data
    if rows is not None:
        w = w.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, cols)
    has_bias = lin.bias is not None if bias is None else bias
    new = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if has_bias:
        if lin.bias is not None:
            b = lin.bias.data if rows is None else lin.bias.data.index_select(0, rows)
            new.bias.data.copy_(b)
        else:
            new.bias.data.zero_()
    return new


def prune_mlp(block: nn.Module, ad: Adapter, keep: torch.Tensor, down_bias: torch.Tensor | None = None) -> None:
    """Keep only neurons ``keep`` (sorted indices) of a block's MLP; optionally add a down bias."""
    import torch

    mlp = mlp_of(block, ad)
    lin = mlp_linears(block, ad)
    keep = keep.to(lin["down"].weight.device)
    inter = lin["down"].in_features
    if ad.fused:
        rows = torch.cat([keep, keep + inter])
        _set(mlp, ad.gate_up, _sliced_linear(lin["gate_up"], rows=rows))
    else:
        _set(mlp, ad.gate, _sliced_linear(lin["gate"], rows=keep))
        _set(mlp, ad.up, _sliced_linear(lin["up"], rows=keep))
    down = _sliced_linear(lin["down"], cols=keep, bias=True if down_bias is not None else None)
    if down_bias is not None:
        down.bias.data += down_bias.to(down.bias)
    _set(mlp, ad.down, down)
    for attr in ("intermediate_size", "ffn_hidden_size"):
        if hasattr(mlp, attr):
            setattr(mlp, attr, len(keep))


def resize_mlp(block: nn.Module, ad: Adapter, size: int, down_bias: bool) -> None:
    """Give a freshly built block an MLP of ``size`` neurons (weights to be loaded after)."""
    import torch

    prune_mlp(block, ad, torch.arange(size), None)
    if down_bias:
        mlp = mlp_of(block, ad)
        old = _get(mlp, ad.down)
        _set(mlp, ad.down, _sliced_linear(old, bias=True))


# Depth pruning (ShortGPT) removes whole blocks: the architectures whose blocks fnprune cannot
# remove, and why. The others count their blocks in ``num_hidden_layers`` and index their KV cache
# by each attention module's ``layer_idx``, which :func:`keep_layers` renumbers.
_CHATGLM_BLOCKS = (
    "ChatGLM3 is remote code: its encoder counts blocks in config.num_layers, numbers them "
    "(layer_number, 1-based) for its attention scaling and indexes its KV cache by position, none "
    "of which fnprune can check against the code a checkpoint ships; use an MLP-only method"
)
NO_BLOCK_REMOVAL: dict[str, str] = {
    "ChatGLMModel": _CHATGLM_BLOCKS,
    "ChatGLMForConditionalGeneration": _CHATGLM_BLOCKS,
}
# Config entries that hold one value per block (Gemma 3's and Qwen's sliding/full attention pattern).
PER_LAYER_CONFIG = ("layer_types",)


def block_removal_refusal(architecture: str) -> str | None:
    """Why the blocks of ``architecture`` cannot be removed, or None when they can (torch-free)."""
    get_adapter(architecture)
    return NO_BLOCK_REMOVAL.get(architecture)


def keep_layers(model: nn.Module, kept: list[int]) -> None:
    """Keep only the blocks ``kept`` (ascending indices), in place: an ordinary smaller model.

    The blocks are removed from the module list, ``config.num_hidden_layers`` and every per-layer
    config entry (:data:`PER_LAYER_CONFIG`) follow, and every module of a kept block that carries a
    ``layer_idx`` (attention: its slot in the KV cache) is renumbered to the block's new position,
    so generation with a cache computes what it computes without one.
    """
    from torch import nn

    arch = architecture_of(model.config)
    why = block_removal_refusal(arch)
    if why:
        raise ValueError(f"cannot remove blocks of {arch}: {why}")
    ad = get_adapter(arch)
    blocks = layers(model, ad)
    n = len(blocks)
    kept = [int(i) for i in kept]
    if not kept or kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= n:
        raise ValueError(f"kept blocks {kept}: expected ascending distinct indices of the model's {n} blocks")
    _set(model, ad.layers, nn.ModuleList([blocks[i] for i in kept]))
    for new, block in enumerate(layers(model, ad)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    cfg = model.config
    for key in PER_LAYER_CONFIG:
        values = getattr(cfg, key, None)
        if values is not None:
            if len(values) != n:
                raise ValueError(f"config.{key} has {len(values)} entries for {n} blocks")
            setattr(cfg, key, [values[i] for i in kept])
    cfg.num_hidden_layers = len(kept)
