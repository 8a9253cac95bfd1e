"""A small stand-in for ChatGLM3 (THUDM/chatglm3-6b ``modeling_chatglm.py``, remote code).

transformers does not ship ChatGLM3 and the tests may not load remote code, so this module
rebuilds its module tree with the same names, shapes and data flow, at toy size:

    ChatGLMForConditionalGeneration
      .transformer                       (ChatGLMModel)
        .embedding.word_embeddings       Embedding(padded_vocab_size, hidden_size)
        .rotary_pos_emb                  RotaryEmbedding(kv_channels // 2), buffer inv_freq
        .encoder                         (GLMTransformer)
          .layers[i]                     (GLMBlock)
            .input_layernorm             RMSNorm
            .self_attention              (SelfAttention)
              .query_key_value           Linear(hidden, (heads + 2 * groups) * kv_channels, bias=add_qkv_bias)
              .core_attention            CoreAttention (no parameters)
              .dense                     Linear(heads * kv_channels, hidden, bias=add_bias_linear)
            .post_attention_layernorm    RMSNorm
            .mlp                         (MLP)
              .dense_h_to_4h             Linear(hidden, 2 * ffn_hidden_size), rows [gate; up]
              .activation_func           swiglu: silu(first half) * second half (a function)
              .dense_4h_to_h             Linear(ffn_hidden_size, hidden)
          .final_layernorm               RMSNorm
        .output_layer                    Linear(hidden, padded_vocab_size, bias=False)

As in the original, hidden states inside the encoder are (seq, batch, hidden), attention is
grouped (``multi_query_group_num`` key/value groups), rotary embeddings act on the first half
of each head in interleaved pairs, ``inv_freq`` is a saved buffer, and ``attention_mask`` is a
(batch, seq) padding mask. The config names ``ChatGLMModel`` as its architecture and carries
no ``hidden_act``, like the hub's. :func:`register` makes the Auto classes resolve
``model_type="chatglm"`` to these classes, as ``trust_remote_code`` does through ``auto_map``.
Left out: generation, the kv cache, the prefix encoder, dropout, non-RMSNorm variants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"

    def __init__(
        self,
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=80,
        num_attention_heads=4,
        multi_query_attention=True,
        multi_query_group_num=2,
        kv_channels=8,
        padded_vocab_size=100,
        add_bias_linear=False,
        add_qkv_bias=True,
        layernorm_epsilon=1e-5,
        seq_length=64,
        **kwargs,
    ):
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.num_attention_heads = num_attention_heads
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.kv_channels = kv_channels
        self.padded_vocab_size = padded_vocab_size
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.layernorm_epsilon = layernorm_epsilon
        self.seq_length = seq_length
        kwargs.setdefault("architectures", ["ChatGLMModel"])
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    x = torch.chunk(x, 2, dim=-1)
    return F.silu(x[0]) * x[1]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x * torch.rsqrt(var + self.eps))).to(x.dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))
        self.dim = dim

    def forward(self, seq_len: int) -> torch.Tensor:
        theta = 1.0 / (10000 ** (torch.arange(0, self.dim, 2, dtype=torch.float) / self.dim))
        idx_theta = torch.outer(torch.arange(seq_len, dtype=torch.float), theta)
        return torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, rope_cache: torch.Tensor) -> torch.Tensor:
    sq, np_ = x.size(0), x.size(2)
    rot_dim = rope_cache.shape[-2] * 2
    x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    xs = x.reshape(sq, -1, np_, rot_dim // 2, 2)
    rc = rope_cache[:sq].view(sq, -1, 1, xs.size(3), 2)
    out = torch.stack(
        [xs[..., 0] * rc[..., 0] - xs[..., 1] * rc[..., 1], xs[..., 1] * rc[..., 0] + xs[..., 0] * rc[..., 1]], -1
    ).flatten(3)
    return torch.cat((out, x_pass), dim=-1)


class CoreAttention(nn.Module):
    def forward(self, q, k, v, blocked):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        ctx = F.scaled_dot_product_attention(q, k, v, ~blocked)
        ctx = ctx.permute(2, 0, 1, 3)
        return ctx.reshape(*ctx.shape[:2], -1)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.groups = config.multi_query_group_num
        self.head_dim = config.kv_channels
        projection = self.heads * self.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size,
            projection + 2 * self.groups * self.head_dim,
            bias=config.add_bias_linear or config.add_qkv_bias,
        )
        self.core_attention = CoreAttention()
        self.dense = nn.Linear(projection, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x, blocked, rope):
        q, k, v = self.query_key_value(x).split(
            [self.heads * self.head_dim, self.groups * self.head_dim, self.groups * self.head_dim], dim=-1
        )
        q = apply_rotary_pos_emb(q.view(*q.shape[:2], self.heads, self.head_dim), rope)
        k = apply_rotary_pos_emb(k.view(*k.shape[:2], self.groups, self.head_dim), rope)
        v = v.view(*v.shape[:2], self.groups, self.head_dim)
        rep = self.heads // self.groups
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        return self.dense(self.core_attention(q, k, v, blocked))


class MLP(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.activation_func = swiglu
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x):
        return self.dense_4h_to_h(self.activation_func(self.dense_h_to_4h(x)))


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, blocked, rope):
        x = x + self.self_attention(self.input_layernorm(x), blocked, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class GLMTransformer(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)

    def forward(self, x, blocked, rope):
        for layer in self.layers:
            x = layer(x, blocked, rope)
        return self.final_layernorm(x)


class Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids).transpose(0, 1).contiguous()


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GLMBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        return


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.seq_length = config.seq_length
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config.kv_channels // 2)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    @staticmethod
    def blocked_positions(attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
        """(batch, 1, seq, seq), True where attention is not allowed (as ``get_masks``)."""
        full = torch.ones(batch, seq, seq).tril_()
        if attention_mask is not None:
            pad = attention_mask.float()
            full = full * pad.unsqueeze(1)
            full -= pad.unsqueeze(-1) - 1
        return (full < 0.5).unsqueeze(1)

    def forward(self, input_ids, attention_mask=None):
        batch, seq = input_ids.shape
        rope = self.rotary_pos_emb(self.seq_length)[None, :seq].transpose(0, 1).contiguous()
        blocked = self.blocked_positions(attention_mask, batch, seq).to(input_ids.device)
        return self.encoder(self.embedding(input_ids), blocked, rope.to(input_ids.device))


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        hidden = self.transformer(input_ids, attention_mask)
        logits = self.transformer.output_layer(hidden).transpose(0, 1).contiguous()
        return CausalLMOutputWithPast(logits=logits)


def register() -> None:
    AutoConfig.register(ChatGLMConfig.model_type, ChatGLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
