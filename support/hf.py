"""
Hugging Face interop: OpenAI's GPT-2 (and any GPT2LMHeadModel or NanoChatForCausalLM folder) as our GPT, and our
GPT exported as a folder that transformers' AutoModelForCausalLM loads, with GPT-2's tokenizer files beside it.

    model = from_pretrained("gpt2")                     # OpenAI's 124M, through the Hub
    save_pretrained(model, "hf_out/")                   # config.json, model.safetensors, tokenizer files
    model = load_model("log/model_19072.pt")            # ours, an HF folder or an HF name: every script's loader

Our parameter names are Hugging Face's GPT-2 names; only the Conv1D layout (transposed) and, for NanoChat,
the names and the split q/k/v differ.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from gpt2 import GPT, GPT2_VOCAB_SIZE, RMS_NORM_EPS, GPTConfig
from support.checkpoints import is_checkpoint, load_checkpoint, model_entries, model_from_checkpoint, save_checkpoint
from support.files import atomic_write
from support.tokenizer import EOT_TOKEN, hf_tokenizer_files

GPT2_SIZES = {  # OpenAI's four checkpoints
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}

# -----------------------------------------------------------------------------
# Layouts: which transformers class computes our model, and its names for our weights

# HF stores these as Conv1D weights, (in, out); nn.Linear's are (out, in)
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# NanoChat's names for a block's matrices (nn.Linear's layout, as ours)
_NANOCHAT_NAMES = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
                   "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_HF_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu2": "relu2"}  # both GELUs: the tanh one


def hf_architecture(config: GPTConfig) -> str:
    """The transformers class that computes what our model does: GPT2LMHeadModel for learned positions with
    LayerNorm (untied, ReLU^2, split q/k/v and no biases too: written as GPT-2's zeros), NanoChatForCausalLM
    for RoPE with RMSNorm, QK-norm and no biases (either MLP, tied or not, any softcap). Anything else is a
    ValueError naming the option, since no class computes it."""
    if config.pos_emb == "learned":
        arch = "GPT2LMHeadModel"
        unsupported = {"--norm rmsnorm": config.norm == "rmsnorm", "--qk-norm": config.qk_norm,
                       "--logit-softcap": config.logit_softcap > 0}
    else:
        arch = "NanoChatForCausalLM"
        unsupported = {"--norm layernorm": config.norm == "layernorm", "--no-qk-norm": not config.qk_norm,
                       "--bias": config.bias}
    bad = [flag for flag, used in unsupported.items() if used]
    if bad:
        raise ValueError(f"cannot export a model with {bad[0]} and --pos-emb {config.pos_emb}: no transformers class "
                         "computes it (GPT2LMHeadModel: learned positions, LayerNorm, no QK-norm, no softcap; "
                         "NanoChatForCausalLM: rope, rmsnorm, QK-norm, no biases); --format pt exports any model")
    nanochat_only = {"--value-embeds": config.value_embeds, "--layer-scalars": config.layer_scalars,
                     "--smear": config.smear, "--backout": config.backout, f"--qk-gain {config.qk_gain:g}":
                     config.qk_gain != 1}  # nanochat's own model has them; transformers' NanoChat (5.x) does not
    bad = [flag for flag, used in nanochat_only.items() if used]
    if bad:
        raise ValueError(f"cannot export a model with {' '.join(bad)} as a Hugging Face folder: transformers' "
                         f"{arch} does not compute {'it' if len(bad) == 1 else 'them'}; --format pt exports any model "
                         "(our load_model reads it)")
    return arch


def hf_model_type(folder) -> str | None:
    """config.json's model_type ("gpt2", "nanochat", ...), or None where there is none."""
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()).get("model_type") if path.is_file() else None


def to_gpt2_layout(sd: dict) -> dict:
    """Our GPT-2-architecture weights as GPT2LMHeadModel's: c_q, c_k, c_v concatenated into c_attn, absent biases
    as zeros (a Linear's: its rows; a LayerNorm's: its width), the Conv1D weights transposed."""
    sd = dict(sd)
    for k in [k for k in sd if ".attn.c_q." in k]:  # weight, and bias where there is one
        prefix, kind = k.split(".attn.c_q.")
        sd[f"{prefix}.attn.c_attn.{kind}"] = torch.cat([sd.pop(f"{prefix}.attn.c_{n}.{kind}") for n in "qkv"])
    for k in [k for k in sd if k.endswith(".weight") and (".h." in k or ".ln_f." in k)]:
        sd.setdefault(k.removesuffix("weight") + "bias", torch.zeros(sd[k].size(0)))
    return {k: v.t() if k.endswith(_CONV1D_WEIGHTS) else v for k, v in sd.items()}


def from_gpt2_layout(hf_sd: dict) -> dict:
    """GPT2LMHeadModel's weights under our names (the same, but the Conv1D weights transposed)."""
    skip = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers
    return {k: v.t() if k.endswith(_CONV1D_WEIGHTS) else v for k, v in hf_sd.items() if not k.endswith(skip)}


def to_nanochat_names(sd: dict) -> dict:
    """Our weights under NanoChatForCausalLM's names: a fused c_attn cut into q, k, v (its rows, in that order)."""
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)\.weight", k)
        if k == "transformer.wte.weight":
            out["model.embed_tokens.weight"] = v
        elif m and m[2] == "attn.c_attn":
            for n, part in zip("qkv", v.chunk(3)):
                out[f"model.layers.{m[1]}.{_NANOCHAT_NAMES['attn.c_' + n]}.weight"] = part
        elif m:
            out[f"model.layers.{m[1]}.{_NANOCHAT_NAMES[m[2]]}.weight"] = v
        else:
            out[k] = v  # lm_head.weight (untied)
    return out


def from_nanochat_names(hf_sd: dict) -> dict:
    """NanoChatForCausalLM's weights under our names (q, k, v kept apart: c_q, c_k, c_v)."""
    ours = {theirs: mine for mine, theirs in _NANOCHAT_NAMES.items()}
    out = {}
    for k, v in hf_sd.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", k)
        if k == "model.embed_tokens.weight":
            out["transformer.wte.weight"] = v
        elif m and m[2] in ours:
            out[f"transformer.h.{m[1]}.{ours[m[2]]}.weight"] = v
        else:
            out[k] = v  # lm_head.weight; anything else is reported as unexpected
    return out


def gpt2_options(c) -> dict:
    """GPTConfig's fields for a transformers GPT2Config."""
    if c.activation_function not in _HF_ACTIVATIONS:
        raise ValueError(f"activation {c.activation_function!r} is not GPT-2's tanh GELU (nor ReLU^2)")
    return dict(block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                mlp=_HF_ACTIVATIONS[c.activation_function], tie_embeddings=c.tie_word_embeddings)


def nanochat_options(c) -> dict:
    """GPTConfig's fields for a transformers NanoChatConfig; a ValueError for what our model cannot compute."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = c.rope_parameters or {}
    differences = {
        "grouped-query attention (num_key_value_heads != num_attention_heads)":
            c.num_key_value_heads != c.num_attention_heads,
        f"intermediate_size {c.intermediate_size} (ours: 4 x hidden_size)": c.intermediate_size != 4 * c.hidden_size,
        f"rms_norm_eps {c.rms_norm_eps} (ours: {RMS_NORM_EPS})": c.rms_norm_eps != RMS_NORM_EPS,
        f"hidden_act {c.hidden_act!r}": c.hidden_act not in _HF_ACTIVATIONS,
        "attention_bias": c.attention_bias,
        f"rope_type {rope.get('rope_type')!r}": rope.get("rope_type", "default") != "default",
        f"head_dim {head_dim} (ours: hidden_size / num_attention_heads)": head_dim * c.num_attention_heads
            != c.hidden_size,
    }
    bad = [what for what, differs in differences.items() if differs]
    if bad:
        raise ValueError(f"NanoChat model with {bad[0]}: our GPT cannot represent it")
    return dict(block_size=c.max_position_embeddings, n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                n_embd=c.hidden_size, pos_emb="rope", rope_base=float(rope.get("rope_theta", 10000.0)),
                norm="rmsnorm", qk_norm=True, mlp=_HF_ACTIVATIONS[c.hidden_act], bias=False, split_qkv=True,
                tie_embeddings=c.tie_word_embeddings, logit_softcap=float(c.final_logit_softcapping or 0.0))


# -----------------------------------------------------------------------------
# Import and export


def from_pretrained(name_or_path: str, vocab_size: int | None = None) -> GPT:
    """OpenAI's GPT-2 (`gpt2` ... `gpt2-xl`, through the Hub), or a local folder holding a GPT2LMHeadModel or
    a NanoChatForCausalLM (what save_pretrained writes).

    vocab_size pads the embedding (e.g. to 50304 for training); the new rows start at zero.
    """
    local = Path(name_or_path).is_dir()
    if not local and name_or_path.removeprefix("openai-community/") not in GPT2_SIZES:
        raise ValueError(f"unknown model {name_or_path!r}: use one of {', '.join(GPT2_SIZES)}, a folder holding "
                         "a GPT2LMHeadModel or NanoChatForCausalLM (config.json), or one of our .pt checkpoints")
    if local and hf_model_type(name_or_path) == "nanochat":
        from transformers import NanoChatForCausalLM

        return from_hf_model(NanoChatForCausalLM.from_pretrained(name_or_path), vocab_size)
    from transformers import GPT2LMHeadModel

    return from_hf_model(GPT2LMHeadModel.from_pretrained(name_or_path), vocab_size)


def from_hf_model(hf, vocab_size: int | None = None) -> GPT:
    """Ours from a transformers GPT2LMHeadModel or NanoChatForCausalLM; vocab_size pads the embedding."""
    c = hf.config
    if c.model_type == "nanochat":
        options, weights = nanochat_options(c), from_nanochat_names(hf.state_dict())
    else:
        options, weights = gpt2_options(c), from_gpt2_layout(hf.state_dict())
    config = GPTConfig(vocab_size=max(c.vocab_size, vocab_size or 0), **options)
    model = GPT(config)
    load_hf_weights(model, weights)
    return model


def load_hf_weights(model: GPT, weights: dict[str, torch.Tensor]) -> None:
    """Weights under our names (from_gpt2_layout, from_nanochat_names) copied in; the embedding's (and an
    untied head's) rows past the checkpoint's vocab start at zero."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}  # HF's copy of the tied wte
    missing = set(sd) - set(weights) - ({"lm_head.weight"} if model.config.tie_embeddings else set())
    unexpected = set(weights) - set(sd)
    if missing or unexpected:
        raise ValueError(f"Hugging Face checkpoint lacks {sorted(missing)[:5]}, has no place for "
                         f"{sorted(unexpected)[:5]}")
    with torch.no_grad():
        for k, v in weights.items():
            if k in ("transformer.wte.weight", "lm_head.weight") and v.size(0) < sd[k].size(0):
                sd[k].zero_()
                sd[k][: v.size(0)].copy_(v)
                continue
            if sd[k].shape != v.shape:
                raise ValueError(f"{k}: ours {tuple(sd[k].shape)}, Hugging Face {tuple(v.shape)}")
            sd[k].copy_(v)


def to_hf_state_dict(model: GPT, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Our weights under the names and layouts of the export's class (hf_architecture), padded vocab rows
    dropped; a tied lm_head left out (transformers ties it to the embedding again)."""
    vocab_size = vocab_size or model.real_vocab_size()
    sd = dict(model.state_dict())
    if model.config.tie_embeddings:
        del sd["lm_head.weight"]
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in sd.items()}
    for k in ("transformer.wte.weight", "lm_head.weight"):
        if k in sd:
            sd[k] = sd[k][:vocab_size]
    to_hf = to_gpt2_layout if hf_architecture(model.config) == "GPT2LMHeadModel" else to_nanochat_names
    return {k: v.contiguous() for k, v in to_hf(sd).items()}


def save_pretrained(model: GPT, out_dir, vocab_size: int | None = None) -> None:
    """Write config.json + model.safetensors that `AutoModelForCausalLM.from_pretrained(out_dir)` loads, as a
    GPT2LMHeadModel or a NanoChatForCausalLM (hf_architecture: a ValueError, before anything is written,
    for a model neither computes), and GPT-2's tokenizer files when the model uses GPT-2's tokens
    (AutoTokenizer loads them offline)."""
    from safetensors.torch import save_file

    vocab_size = vocab_size or model.real_vocab_size()
    config = hf_config(model, vocab_size)  # checks the architecture first
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / "model.safetensors") as tmp:
        save_file(to_hf_state_dict(model, vocab_size), str(tmp), metadata={"format": "pt"})
    with atomic_write(out_dir / "config.json") as tmp:
        tmp.write_text(config.to_json_string())
    if vocab_size == GPT2_VOCAB_SIZE:
        for name, text in hf_tokenizer_files(model.config.block_size).items():
            with atomic_write(out_dir / name) as tmp:
                tmp.write_text(text)


def hf_config(model: GPT, vocab_size: int):
    """The export's config: GPT2Config, or NanoChatConfig (rms_norm_eps ours, RoPE's base, the softcap)."""
    from transformers import GPT2Config, NanoChatConfig

    cfg, arch = model.config, hf_architecture(model.config)
    special = EOT_TOKEN if vocab_size > EOT_TOKEN else None  # <|endoftext|>, when the vocab has it
    if arch == "GPT2LMHeadModel":
        return GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                          n_layer=cfg.n_layer, n_head=cfg.n_head,
                          activation_function="gelu_new" if cfg.mlp == "gelu" else "relu2",
                          bos_token_id=special, eos_token_id=special, tie_word_embeddings=cfg.tie_embeddings,
                          architectures=[arch])
    return NanoChatConfig(vocab_size=vocab_size, hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
                          num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                          num_key_value_heads=cfg.n_head, max_position_embeddings=cfg.block_size,
                          hidden_act="gelu_pytorch_tanh" if cfg.mlp == "gelu" else "relu2",
                          rms_norm_eps=RMS_NORM_EPS,
                          rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
                          final_logit_softcapping=cfg.logit_softcap or None, attention_bias=False,
                          bos_token_id=special, eos_token_id=special, pad_token_id=None,
                          tie_word_embeddings=cfg.tie_embeddings, architectures=[arch])


# -----------------------------------------------------------------------------
# One loader for every script, and `train_gpt2.py export`


def read_model(name_or_path: str, vocab_size: int | None = None) -> GPT:
    """One loader for every script: one of our .pt checkpoints, an HF folder, or an HF model name (on the CPU).
    vocab_size pads an HF model's embedding (e.g. to 50304 for training)."""
    if not is_checkpoint(name_or_path):
        return from_pretrained(name_or_path, vocab_size=vocab_size)
    if not Path(name_or_path).is_file():
        raise FileNotFoundError(f"checkpoint {name_or_path} not found")
    return model_from_checkpoint(load_checkpoint(name_or_path))


def load_model(name_or_path: str, device="cpu") -> GPT:
    """read_model, on the device, in eval mode: for sampling, evaluating, exporting."""
    return read_model(name_or_path).to(device).eval()


def export_main(argv: list[str]) -> None:
    """`train_gpt2.py export CHECKPOINT OUT_DIR` (a Hugging Face folder), or `... --format pt CHECKPOINT OUT.pt`."""
    p = argparse.ArgumentParser(prog="train_gpt2.py export",
                                description="Write one of our checkpoints as a Hugging Face folder: a GPT2LMHeadModel "
                                "(GPT-2's architecture) or a NanoChatForCausalLM (RoPE, RMSNorm, QK-norm, no biases); "
                                "or, --format pt, any model as a plain PyTorch file (weights + config).")
    p.add_argument("checkpoint", help="a model_XXXXX.pt written by training")
    p.add_argument("out", help="hf: a folder for config.json + model.safetensors; pt: a file OUT.pt")
    p.add_argument("--format", choices=("hf", "pt"), default="hf", help="hf (default): for transformers; pt: "
                   "{'model': state_dict, 'config': GPTConfig's fields}, which load_model and every script read")
    a = p.parse_args(argv)
    model = load_model(a.checkpoint)
    if a.format == "pt":
        if not a.out.endswith(".pt"):
            p.error(f"--format pt writes one file: give OUT a .pt name, not {a.out}")
        save_checkpoint(a.out, model_entries(model))  # no optimizer, no training state
        print(f"wrote {a.out}: load it with support.hf.load_model({a.out!r}), or torch.load(weights_only=True)")
        return
    save_pretrained(model, a.out)  # a model no transformers class computes: a ValueError, nothing written
    print(f"wrote {a.out}: load it with AutoModelForCausalLM.from_pretrained({a.out!r}) "
          f"(a {hf_architecture(model.config)})")
