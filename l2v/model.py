"""One self-contained decoder for the Llama, Qwen and Gemma families in plain PyTorch; one `is_causal` switch.

References: Meta's llama `model.py` (the math) and Hugging Face `modeling_llama.py` (the weight names and
the `rotate_half` RoPE layout, so HF q/k weights load without any permutation); HF `modeling_qwen3.py`
and `modeling_gemma.py`, `modeling_gemma2.py`, `modeling_gemma3.py` for what the other families change.

One model; the families differ by switches of `ModelConfig`, which `l2v.checkpoint` fills from the
checkpoint's own config.json:
  - Llama 2, 3, 3.1/3.2 (`llama3` RoPE scaling), SmolLM2 (tied embeddings): the plain decoder;
  - Mistral: a sliding window (causal attention only); Qwen2: q/k/v biases; Qwen3: q/k norms;
  - Gemma: embeddings x sqrt(D), norms scaling by (1 + w), GeGLU, a head dim of its own;
  - Gemma 2: + norms after attention and MLP, local (sliding-window) layers alternating with global
    ones, soft-capped attention scores and LM logits, its own query scale;
  - Gemma 3: Gemma 2 without attention soft-capping, + q/k norms, local layers with their own RoPE base.

It returns hidden states after the final norm and knows nothing of LoRA (`l2v.lora` swaps projections
from outside), files (`l2v.checkpoint`) or pooling (`l2v.encoder`). Shapes: B batch, T tokens, D model
dim, H query heads, K key/value heads, hd head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

# The gate's activation, under HF's names: SwiGLU (silu) or GeGLU (Gemma: GELU's tanh approximation).
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096  # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": 8.0, ...} or None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    has_lm_head: bool = True  # False: a base model saved without one (Qwen3-Embedding); MNTP refuses it
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v only
    o_bias: bool = False  # Llama's `attention_bias` puts a bias on o_proj too
    mlp_bias: bool = False
    act: str = "silu"  # see ACTIVATIONS
    sliding_window: int | None = None  # local layers: keys at most window - 1 positions back (causal)
    layer_types: list[str] | None = None  # HF's sliding_attention (local) / full_attention; None: all local
    bidirectional_window: bool = False  # Gemma: local layers keep |i - j| <= window // 2 when bidirectional
    local_rope_theta: float | None = None  # Gemma 3: the local layers' RoPE base (unscaled); None: rope_theta
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k before RoPE
    norm_offset: bool = False  # Gemma: norms scale by (1 + w), in float32 before the cast back
    embed_scale: bool = False  # Gemma: embeddings x sqrt(dim)
    sandwich_norms: bool = False  # Gemma 2/3: also a norm on each sublayer's output before the residual add
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: queries scale by its ** -0.5, not head_dim's
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap) before the softmax
    final_softcap: float | None = None  # Gemma 2: the same on the LM logits (MNTP's loss applies it)
    attention_dropout: float = 0.0  # SimCSE trains with 0.3
    is_causal: bool = True  # the one switch LLM2Vec flips; overridable per forward call
    model_type: str = "llama"
    extra: dict = field(default_factory=dict, repr=False)  # HF keys kept for a faithful save


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (hd/2,), float32, with the checkpoint's scaling applied."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is None:
        return inv
    if scaling["rope_type"] == "linear":
        return inv / scaling["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    factor, lo = scaling["factor"], scaling.get("low_freq_factor", 1.0)
    hi = scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, blended, scaled)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, T, hd) in float32 (positions can be large); each attention casts them to its dtype."""
    freqs = positions[..., None].float() * inv_freq.float()  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # HF layout: the head dim is two halves [x1, x2], not interleaved pairs.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32. `vector_norm` reads x in its own dtype: the backward keeps x (bf16), not a
        # float32 copy of it. Llama casts back before the weight, Gemma after its (1 + w): HF's order, each.
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square() / x.shape[-1]
        normed = x * torch.rsqrt(ms + self.eps)  # float32
        if self.offset:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


def softcapped_attention(
    q, k, v, mask, is_causal: bool, scale: float | None, cap: float, dropout_p: float
) -> torch.Tensor:
    """SDPA's math with Gemma 2's soft-capping of the scores, which no fused SDPA kernel offers (why this
    path and not FlexAttention: docs/performance.md). q (B, H, T, hd), k and v (B, K, T, hd); mask: SDPA's."""
    T = q.shape[-2]
    k, v = (repeat(t, "b k t d -> b (k g) t d", g=q.shape[1] // k.shape[1]) for t in (k, v))
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, H, T, T)
    s = torch.tanh(s / cap) * cap  # before the mask, as in Gemma 2
    if mask is None and is_causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))  # every row keeps its own key: no empty row
    p = F.dropout(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), dropout_p)
    return p @ v  # (B, H, T, hd)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout, self.softcap = cfg.attention_dropout, cfg.attn_softcap
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_offset)

    def forward(self, x, cos, sin, mask, is_causal: bool) -> torch.Tensor:
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", d=self.head_dim)  # (B, H, T, hd)
        k = rearrange(self.k_proj(x), "b t (k d) -> b k t d", d=self.head_dim)  # (B, K, T, hd)
        v = rearrange(self.v_proj(x), "b t (k d) -> b k t d", d=self.head_dim)  # (B, K, T, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # (B, 1, T, hd); bf16 under autocast
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        dropout = self.dropout if self.training else 0.0
        if self.softcap is not None:
            y = softcapped_attention(q, k, v, mask, is_causal, self.scale, self.softcap, dropout)
            return self.o_proj(rearrange(y, "b h t d -> b t (h d)"))
        gqa = self.n_kv_heads != self.n_heads
        if gqa and mask is not None and q.is_cuda:
            # CUDA has no fused kernel for a mask with grouped K/V heads (SDPA would fall back to its
            # slow math path), so give every query head its own copy of its K/V head.
            k, v = (repeat(t, "b k t d -> b (k g) t d", g=self.n_heads // self.n_kv_heads) for t in (k, v))
            gqa = False
        # The single place where attention is causal or not: SDPA (and the soft-capped path above) gets
        # either the flag (one unpadded text per row) or a boolean mask that encodes causality (`build_mask`).
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=is_causal and mask is None,
            scale=self.scale,
            enable_gqa=gqa,
        )  # (B, H, T, hd)
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)"))


def glu(g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    return ACTIVATIONS[act](g) * u


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = cfg.act
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        # Training keeps g and u for the backward; recomputing act(g) there spares keeping it too.
        h = (
            checkpoint(glu, g, u, self.act, use_reentrant=False, preserve_rng_state=False)
            if g.requires_grad
            else glu(g, u, self.act)
        )
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.self_attn = Attention(cfg)
        # Llama's norm before the MLP; Gemma 2/3 (sandwich) use this name for the norm after attention.
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.mlp = MLP(cfg)
        self.sandwich = cfg.sandwich_norms
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
            self.post_feedforward_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)

    def forward(self, x, cos, sin, mask, is_causal: bool) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal)
        if not self.sandwich:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def build_mask(
    segments: torch.Tensor | None, is_causal: bool, window: int | None, T: int, device
) -> torch.Tensor | None:
    """Boolean (B|1, 1, T, T) mask for SDPA (True = may attend), or None when the flag suffices.
    segments (B, T): 0 = padding, k > 0 = the row's k-th text. A query sees its own text's keys: all
    (bidirectional) or those at or before it (causal); a window keeps the keys with i - j < window (causal)
    or |i - j| <= window // 2 (bidirectional, as EmbeddingGemma). A text's tokens are contiguous in its row,
    so distances in the row are distances in the text. Every row sees itself, so a padding query never
    has an empty row (NaN in SDPA)."""
    reach = None if window is None else (window - 1 if is_causal else window // 2)  # farthest key seen
    use_window = reach is not None and T - 1 > reach
    if segments is None and not use_window:
        return None
    i = torch.arange(T, device=device)
    allowed = torch.ones(1, T, T, dtype=torch.bool, device=device)
    if segments is not None:
        allowed = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)  # (B, T, T)
    if is_causal:
        allowed = allowed & (i[:, None] >= i[None, :])
    if use_window:
        allowed = allowed & ((i[:, None] - i[None, :]).abs() <= reach)
    return allowed[:, None] | torch.eye(T, dtype=torch.bool, device=device)


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """RoPE positions that restart at 0 at the first token of every text of a packed row (B, T).
    With one text per row this counts real tokens only, so left or right padding moves nothing."""
    T = segments.shape[-1]
    i = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return i - torch.where(starts, i, 0).cummax(-1).values


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        # Tied checkpoints (SmolLM2, Gemma, small Qwen2/3, Llama 3.2 1B/3B) reuse the embedding as LM head.
        untied = not cfg.tie_word_embeddings and cfg.has_lm_head
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False) if untied else None
        # Built explicitly on the CPU so they exist even when the model is built on `meta`.
        self.register_buffer(
            "inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )
        local = cfg.local_rope_theta  # Gemma 3's local layers: a base of their own, unscaled
        local = None if local is None else rope_inv_freq(cfg.head_dim, local, None)
        self.register_buffer("local_inv_freq", local, persistent=False)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> final hidden states (B, T, D). attention_mask (B, T): 0 = padding (either
        side), k > 0 = a token of the row's k-th text (1 for one text per row). Texts attend only within
        themselves and their RoPE positions start at 0: a text computes the same alone or packed (up to
        rounding). None = unpadded rows of one text; not inferred, as that would stall a GPU every call."""
        cfg = self.config
        is_causal = cfg.is_causal if is_causal is None else is_causal
        B, T = input_ids.shape
        if attention_mask is None:  # one unpadded text per row: SDPA's fast unmasked path
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        else:
            positions = segment_positions(attention_mask)
        x = self.embed_tokens(input_ids)  # (B, T, D)
        if cfg.embed_scale:  # sqrt(D) rounded to the weights' dtype first (bf16: 55.4 -> 55.5), as HF does
            x = x * torch.tensor(cfg.dim**0.5).to(x.dtype).item()
        rope = rope_angles(positions, self.inv_freq)
        local_rope = rope if self.local_inv_freq is None else rope_angles(positions, self.local_inv_freq)
        # Local layers see a window; bidirectional, only where the family keeps it (Gemma; Mistral's is off).
        window = cfg.sliding_window if is_causal or cfg.bidirectional_window else None
        mask = build_mask(attention_mask, is_causal, None, T, x.device)
        local_mask = mask if window is None else build_mask(attention_mask, is_causal, window, T, x.device)
        for layer, kind in zip(self.layers, cfg.layer_types or ["sliding_attention"] * cfg.n_layers):
            local = kind == "sliding_attention"
            args = (*(local_rope if local else rope), local_mask if local else mask, is_causal)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, *args, use_reentrant=False)
            else:
                x = layer(x, *args)
        return self.norm(x)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if not self.config.has_lm_head:
            raise ValueError("the model has no LM head (an untied base model saved without lm_head.weight)")
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
