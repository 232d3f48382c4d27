"""The LLaMA-family transformer, top to bottom in one file.

Llama 1/2/3/3.1/3.2, TinyLlama, SmolLM, Mistral and Qwen2 differ only in `ModelConfig` flags.
The module tree mirrors transformers' `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj`,
...), so a state dict *is* a Hugging Face checkpoint and PEFT target names carry over.

Inference passes a `KVCache` and the position of every input token; slot `p` of the cache
holds position `p` of its row, so rows of different lengths share one batch without padding
tricks: a row's padded tail writes slots that are overwritten before they are ever attended to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from llmasos.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32, scale in the input dtype: the order transformers uses, so bf16 agrees too.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """Rotary inverse frequencies, with `linear` or Llama 3.1 `llama3` scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif config.rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class Rotary(nn.Module):
    """cos/sin of each position, computed in fp32 from the positions actually present."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # On the meta device (a model about to be loaded) computed on the CPU instead: arithmetic on meta tensors
        # imports torch._dynamo, seconds of a cold start. `reset` moves it where the weights go.
        meta = torch.get_default_device().type == "meta"
        self.register_buffer("inv_freq", rope_inv_freq(config, "cpu" if meta else None), persistent=False)

    def reset(self, device: torch.device | str | None = None) -> None:
        """Recompute the buffer: needed after building the model on the meta device."""
        self.inv_freq = rope_inv_freq(self.config, device)

    def forward(self, input_pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = input_pos[..., None].float() * self.inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # [B, S, 1, D]: broadcast over heads
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + D/2): the Hugging Face layout (Meta's interleaved one is permuted on import)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class ForwardBatch:
    """The tokens of one forward pass as every layer needs to know them, worked out once by `Transformer.forward`."""

    cos: Tensor
    sin: Tensor
    input_pos: Tensor  # [B, S]
    mask: Tensor | None  # [B, 1, S, kv_len] bool, True = may attend; None: causal, or all visible
    causal: bool
    kv_len: int  # cache slots attended to (with a cache)
    start: int | None  # all rows write positions start..start+S-1 (a slice, not a scatter)
    rows: Tensor | None  # [B, 1] row index for the scatter when start is None
    cache: KVCache | None
    row0: int  # the batch's first row in the cache


class KVCache:
    """Preallocated keys and values, [rows, kv_heads, max_len, head_dim] per layer.

    Slot p of a row holds position p. A forward pass on B sequences uses rows row0..row0+B-1.
    """

    def __init__(
        self,
        config: ModelConfig,
        rows: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (rows, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.rows, self.max_len = rows, max_len

    def update(self, layer: int, batch: ForwardBatch, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new keys/values [B, H, S, D] at their positions; return the slots to attend to."""
        b, s = k.shape[0], k.shape[2]
        kc, vc = self.k[layer][batch.row0 : batch.row0 + b], self.v[layer][batch.row0 : batch.row0 + b]
        if batch.start is not None:
            kc[:, :, batch.start : batch.start + s] = k
            vc[:, :, batch.start : batch.start + s] = v
        else:
            kc[batch.rows, :, batch.input_pos] = k.transpose(1, 2).to(kc.dtype)  # advanced indices first: [B, S, H, D]
            vc[batch.rows, :, batch.input_pos] = v.transpose(1, 2).to(vc.dtype)
        return kc[:, :, : batch.kv_len], vc[:, :, : batch.kv_len]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` slots of row `src` into row `dst` (n samples of one prompt, compaction)."""
        for kc, vc in zip(self.k, self.v):
            kc[dst, :, :length] = kc[src, :, :length]
            vc[dst, :, :length] = vc[src, :, :length]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.sliding_window = config.sliding_window
        qkv_bias = config.attention_bias or config.qkv_bias
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=config.attention_bias)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values, flat ([B, S, heads * head_dim])."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def rotate(self, q: Tensor, k: Tensor, batch: ForwardBatch) -> tuple[Tensor, Tensor]:
        """Rotary embedding of queries and keys, [B, S, heads, head_dim]."""
        return apply_rope(q, batch.cos, batch.sin), apply_rope(k, batch.cos, batch.sin)

    def forward(self, x: Tensor, batch: ForwardBatch) -> Tensor:
        b, s, _ = x.shape
        q, k, v = self.project(x)
        q, k = self.rotate(q.view(b, s, self.n_heads, self.head_dim), k.view(b, s, self.n_kv, self.head_dim), batch)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        if batch.cache is not None:
            k, v = batch.cache.update(self.layer, batch, k, v)
        # Attention runs in the cache's dtype, which may be wider than the activations' (`Transformer.cache_dtype`).
        y = self.attend(q.to(k.dtype), k, v, batch).to(x.dtype)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: ForwardBatch) -> Tensor:
        """[B, heads, S, head_dim] attention of the queries over the keys and values `batch` lets them see."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=batch.mask, is_causal=batch.causal, enable_gqa=self.n_kv != self.n_heads
        )


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, batch: ForwardBatch) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Decoder-only LLaMA: embeddings, N pre-norm blocks, final norm, LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
                layers=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
                norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config)
        self.checkpoint_blocks = False
        # Decided for inference by `llmasos.models.fast.set_inference_dtypes` (None: the weights' dtype): the
        # activations' dtype (fp32 over bf16 weights where the CPU has no bf16 arithmetic) and the KV cache's.
        self.activation_dtype: torch.dtype | None = None
        self.cache_dtype: torch.dtype | None = None
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random initialisation for pretraining: N(0, std) weights, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.tie_weights()

    def enable_activation_checkpointing(self) -> None:
        """In training, recompute each block's activations during the backward pass instead of storing them."""
        self.checkpoint_blocks = True

    def compile_decode(self) -> None:
        """torch.compile the forward pass, with dynamic shapes (the attended cache grows every step)."""
        self.forward = torch.compile(self.forward, dynamic=True)

    def new_cache(self, rows: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        weight = self.model.embed_tokens.weight
        return KVCache(
            self.config,
            rows,
            max_len or self.config.max_position_embeddings,
            dtype or self.cache_dtype or weight.dtype,
            weight.device,
        )

    def _mask(self, input_pos: Tensor, kv_len: int) -> Tensor:
        """[B, 1, S, kv_len] bool: key j is visible to a query at position p when j <= p (and within the window)."""
        keys = torch.arange(kv_len, device=input_pos.device)
        q = input_pos[:, :, None]
        mask = keys <= q
        if self.config.sliding_window is not None:
            mask &= keys > q - self.config.sliding_window
        return mask[:, None]

    def forward(
        self,
        input_ids: Tensor,
        input_pos: Tensor | None = None,
        cache: KVCache | None = None,
        logits_at: Tensor | None = None,
        cache_row: int = 0,
        head: bool = True,
        logits_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, S, vocab] for `input_ids` [B, S] (head=False: the final norm's output [B, S, hidden], which
        embeddings pool).

        Without `input_pos` the tokens are positions 0..S-1 of fresh sequences (training, scoring, or a
        prefill into `cache`). With `cache` and `input_pos` ([B, S] or [S]), each token is written at its
        position in cache rows cache_row.. and attends to every earlier slot of its row.
        logits_at: an index [B] into the sequence; only that position's logits are computed ([B, 1, vocab]).
        logits_mask: a bool [B, S]; only its True positions' logits are computed, [N, vocab] in row-major
        order (training on some tokens only, as DPO's completions: the LM head skips the others).
        """
        b, s = input_ids.shape
        window = self.config.sliding_window
        if input_pos is None or cache is None:
            pos = torch.arange(s, device=input_ids.device).expand(b, s) if input_pos is None else input_pos
            if pos.dim() == 1:
                pos = pos.expand(b, s)
            mask = self._mask(pos, s) if window is not None and s > window else None
            kv_len, start, causal = s, 0, mask is None
        else:
            pos = input_pos.expand(b, s) if input_pos.dim() == 1 else input_pos
            kv_len = int(pos.max()) + 1
            # One new token per row: a slice write when every row is at the same position.
            start = kv_len - 1 if s == 1 and (b == 1 or input_pos.dim() == 1) else None
            all_visible = s == 1 and start is not None and (window is None or kv_len <= window)
            mask = None if all_visible else self._mask(pos, kv_len)
            causal = False
        x = self.model.embed_tokens(input_ids)
        if self.activation_dtype is not None:
            x = x.to(self.activation_dtype)
        cos, sin = self.rotary(pos, x.dtype)
        rows = torch.arange(b, device=input_ids.device)[:, None] if cache is not None and start is None else None
        batch = ForwardBatch(cos, sin, pos, mask, causal, kv_len, start, rows, cache, cache_row)
        for block in self.model.layers:
            if self.checkpoint_blocks and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, batch, use_reentrant=False)
            else:
                x = block(x, batch)
        if logits_at is not None:
            x = x[torch.arange(b, device=x.device), logits_at][:, None]
        elif logits_mask is not None:
            x = x[logits_mask]
        x = self.model.norm(x)
        return self.lm_head(x) if head else x
