"""A self-contained Llama-family decoder in plain PyTorch, with one `is_causal` switch.

References: Meta's llama `model.py` (the math) and Hugging Face `modeling_llama.py` (the weight
names and the `rotate_half` RoPE layout, so HF q/k weights load without any permutation).

Families, all read from the checkpoint's own config.json: Llama 2, Llama 3, Llama 3.1/3.2 (`llama3`
RoPE scaling), Mistral (sliding window), Qwen2 (q/k/v biases), SmolLM2 (tied embeddings).

It returns hidden states after the final norm and knows nothing of LoRA (`l2v.lora` swaps projections
from outside), files (`l2v.checkpoint`) or pooling (`l2v.encoder`). Shapes: B batch, T tokens, D model
dim, H query heads, K key/value heads, hd head dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v only
    o_bias: bool = False  # Llama's `attention_bias` puts a bias on o_proj too
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral; applies to causal attention only
    attention_dropout: float = 0.0  # SimCSE trains with 0.3
    is_causal: bool = True  # the one switch LLM2Vec flips; overridable per forward call
    model_type: str = "llama"
    extra: dict = field(default_factory=dict, repr=False)  # HF keys kept for a faithful save

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Map the ~15 fields we need from an HF config.json; refuse what we cannot run faithfully."""
        mt = hf.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: unsupported model_type {mt!r}; l2v supports {SUPPORTED_MODEL_TYPES}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: unsupported hidden_act {act!r}; only 'silu' (SwiGLU) is implemented")
        try:
            dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
            cfg = cls(vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                      n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=hf.get("head_dim") or dim // n_heads,
                      intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                      max_position_embeddings=hf.get("max_position_embeddings", 4096),
                      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), model_type=mt,
                      attention_dropout=float(hf.get("attention_dropout", 0.0) or 0.0), extra=dict(hf))
        except KeyError as e:
            raise ValueError(f"{source}: missing required key {e.args[0]!r}") from None
        # HF has stored RoPE settings in two ways over time: flat keys (v4) or `rope_parameters` (v5).
        rope = dict(hf.get("rope_scaling") or {})
        params = hf.get("rope_parameters") or {}
        cfg.rope_theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
        if not rope and params.get("rope_type", "default") != "default":
            rope = {k: v for k, v in params.items() if k != "rope_theta"}
        if rope:
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"{source}: unsupported rope_scaling type {kind!r}; l2v supports {SUPPORTED_ROPE_TYPES}")
            cfg.rope_scaling = None if kind == "default" else {**rope, "rope_type": kind}
        if mt == "qwen2":
            cfg.qkv_bias = True
            if hf.get("use_sliding_window", False):
                cfg.sliding_window = hf.get("sliding_window")
        else:
            cfg.qkv_bias = cfg.o_bias = bool(hf.get("attention_bias", False))
            cfg.mlp_bias = bool(hf.get("mlp_bias", False))
        if mt == "mistral":
            cfg.sliding_window = hf.get("sliding_window")
        return cfg

    def to_hf(self) -> dict:
        """An HF config.json dict: the original keys, updated with ours."""
        hf = dict(self.extra)
        hf.update(model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.dim,
                  num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                  head_dim=self.head_dim, intermediate_size=self.intermediate_size, rms_norm_eps=self.norm_eps,
                  rope_theta=self.rope_theta, rope_scaling=self.rope_scaling, hidden_act="silu",
                  max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings)
        hf.setdefault("architectures", [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                         "qwen2": "Qwen2ForCausalLM"}[self.model_type]])
        if self.model_type == "llama":
            hf.update(attention_bias=self.o_bias, mlp_bias=self.mlp_bias)
        return hf


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (hd/2,), float32, with the checkpoint's scaling applied."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # HF layout: the head dim is two halves [x1, x2], not interleaved pairs.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as the reference implementations do.
        # `vector_norm` reads x in its own dtype: the backward keeps x (bf16), not a float32 copy of it.
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square() / x.shape[-1]
        return self.weight * (x * torch.rsqrt(ms + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, is_causal: bool) -> torch.Tensor:
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", d=self.head_dim)  # (B, H, T, hd)
        k = rearrange(self.k_proj(x), "b t (k d) -> b k t d", d=self.head_dim)  # (B, K, T, hd)
        v = rearrange(self.v_proj(x), "b t (k d) -> b k t d", d=self.head_dim)  # (B, K, T, hd)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # (B, 1, T, hd); bf16 under autocast
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        gqa = self.n_kv_heads != self.n_heads
        if gqa and mask is not None and q.is_cuda:
            # CUDA has no fused kernel for a mask with grouped K/V heads (SDPA would fall back to its
            # slow math path), so give every query head its own copy of its K/V head.
            k, v = (repeat(t, "b k t d -> b (k g) t d", g=self.n_heads // self.n_kv_heads) for t in (k, v))
            gqa = False
        # The single place where attention is causal or not: SDPA gets either the flag (one unpadded
        # text per row) or an explicit boolean mask that already encodes causality (see `build_mask`).
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None, enable_gqa=gqa,
        )  # (B, H, T, hd)
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)"))


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        # Training keeps g and u for the backward; recomputing silu(g) there spares keeping it too.
        h = checkpoint(swiglu, g, u, use_reentrant=False, preserve_rng_state=False) if g.requires_grad else swiglu(g, u)
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, is_causal: bool) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_mask(segments: torch.Tensor | None, is_causal: bool, window: int | None, T: int,
               device) -> torch.Tensor | None:
    """Boolean (B|1, 1, T, T) mask for SDPA (True = may attend), or None when the flag suffices.
    segments (B, T): 0 = padding, k > 0 = the row's k-th text. A query sees its own text's keys: all
    (bidirectional), or those at or before it, within a sliding window if any (causal). Every row sees
    itself, so a padding query never has an empty row (NaN in SDPA)."""
    use_window = is_causal and window is not None and T > window
    if segments is None and not use_window:
        return None
    i = torch.arange(T, device=device)
    allowed = torch.ones(1, T, T, dtype=torch.bool, device=device)
    if segments is not None:
        allowed = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)  # (B, T, T)
    if is_causal:
        allowed = allowed & (i[:, None] >= i[None, :])
        if use_window:
            allowed = allowed & (i[:, None] - i[None, :] < window)
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
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied checkpoints (SmolLM2, small Qwen2, Llama 3.2 1B/3B) reuse the embedding as LM head.
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Built explicitly on the CPU so it exists even when the model is built on `meta`.
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                is_causal: bool | None = None) -> torch.Tensor:
        """input_ids (B, T) -> final hidden states (B, T, D). attention_mask (B, T): 0 = padding (either
        side), k > 0 = a token of the row's k-th text (1 for one text per row). Texts attend only within
        themselves and their RoPE positions start at 0: a text computes the same alone or packed (up to
        rounding). None = unpadded rows of one text; not inferred, as that would stall a GPU every call."""
        is_causal = self.config.is_causal if is_causal is None else is_causal
        B, T = input_ids.shape
        if attention_mask is None:  # one unpadded text per row: SDPA's fast unmasked path
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        else:
            positions = segment_positions(attention_mask)
        x = self.embed_tokens(input_ids)  # (B, T, D)
        # RoPE angles in float32 (positions can be large), then cast to the activation dtype.
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        cos, sin = emb.cos(), emb.sin()  # each attention casts them to its activation dtype
        mask = build_mask(attention_mask, is_causal, self.config.sliding_window, T, x.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, is_causal, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, is_causal)
        return self.norm(x)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
