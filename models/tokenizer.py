"""Tokenizer: a ``tokenizers.Tokenizer`` built from GGUF metadata or an HF directory, chat templates, streaming.

The GGUF path rebuilds the tokenizer the way transformers does for ``AutoTokenizer.from_pretrained(dir,
gguf_file=...)`` (``transformers/integrations/gguf/gguf_tokenizer_mapping.py``), so encodings, decodings and
rendered chat templates match transformers for the same file.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import cached_property, lru_cache

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

# Token texts llama.cpp treats as end of generation when they are in the vocabulary.
EOG_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "</s>", "<|end_of_text|>",
              "<end_of_turn>")

# Named special tokens of a GGUF file: transformers' attribute -> the GGUF id key.
_GGUF_SPECIALS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                  "pad_token": "padding_token_id"}

# llama.cpp's pre-tokenizer names whose split regex differs from GPT-2's (as transformers maps them).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types


def gguf_metadata(reader) -> dict:
    """A ``gguf.GGUFReader``'s fields as a plain dict of key -> python value (str, int, float, bool, list)."""
    return {name: field.contents() for name, field in reader.fields.items()}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary and token scores (best first), as transformers derives them."""
    merges = []
    for token, score in scores.items():
        pairs = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]])))
    merges.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _gguf_merges(fields: dict, tokens: list[str]) -> list[tuple[str, ...]]:
    if "tokenizer.ggml.merges" in fields:
        return [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    if "tokenizer.ggml.scores" not in fields:
        raise ValueError("GGUF tokenizer has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
    return generate_merges({t: i for i, t in enumerate(tokens)}, dict(zip(tokens, fields["tokenizer.ggml.scores"])))


def _byte_level_backend(fields: dict, tokens: list[str], pre: str | None) -> _Backend:
    """GPT-2 style byte-level BPE (``tokenizer.ggml.model == "gpt2"``)."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    backend = _Backend(BPE(vocab=vocab, merges=_gguf_merges(fields, tokens), dropout=None,
                           continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(fields: dict, tokens: list[str], arch: str | None) -> _Backend:
    """SentencePiece-style BPE with byte fallback (``tokenizer.ggml.model == "llama"``)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = _Backend(BPE(vocab=vocab, merges=_gguf_merges(fields, tokens), fuse_unk=True, byte_fallback=True,
                           dropout=None))
    if arch == "phi3":  # the prefix space comes from a normalizer, not from Metaspace
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    return backend


def _bos_eos_processor(bos: str | None, bos_id, eos: str | None, eos_id, add_bos: bool, add_eos: bool):
    """transformers' ``update_post_processor``: a template adding BOS and/or EOS around each sequence."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it (a string or an AddedToken dict) -> its text."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Tokenizer:
    """Encode/decode, chat templates and stop tokens of one model, on top of a ``tokenizers.Tokenizer``."""

    def __init__(self, backend: _Backend, special_tokens: dict[str, str] | None = None,
                 chat_template: str | dict[str, str] | None = None, *, extra_stop_ids=(),
                 clean_up_tokenization_spaces: bool = False, add_bos_token: bool = False,
                 add_eos_token: bool = False):
        """``special_tokens``: named special tokens (``bos_token``, ``eos_token``, ...) -> text; they are also
        chat-template variables. ``extra_stop_ids``: ids that end generation besides EOS and known EOG tokens."""
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        # Named special tokens not yet in the tokenizer are added as special, as transformers does.
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in dict.fromkeys(self.special_tokens.values()) if t not in added]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        vocab = backend.get_vocab(with_added_tokens=True)
        stops = {vocab[t] for t in EOG_TOKENS if t in vocab} | {int(i) for i in extra_stop_ids}
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        self.stop_token_ids: set[int] = stops

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, fields: dict) -> Tokenizer:
        """Build from GGUF metadata (see ``gguf_metadata``), as transformers does for ``gguf_file=``."""
        model = fields.get("tokenizer.ggml.model")
        tokens = fields.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError("GGUF metadata has no tokenizer (tokenizer.ggml.tokens is missing)")
        tokens = list(tokens)
        arch = fields.get("general.architecture")
        if model == "gpt2":
            backend = _byte_level_backend(fields, tokens, fields.get("tokenizer.ggml.pre"))
        elif model == "llama" and arch not in ("gemma", "gemma2", "gemma3"):
            backend = _sentencepiece_backend(fields, tokens, arch)
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {model!r} (architecture {arch!r}); supported: "
                             "'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE, not for gemma)")

        # Control tokens become special added tokens (byte-level: only those spelled in the byte alphabet),
        # user-defined ones plain added tokens, so they are matched whole in text.
        types = list(fields.get("tokenizer.ggml.token_type") or ())
        alphabet = set(bytes_to_unicode().values()) if model == "gpt2" else None
        control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
                   if k == _CONTROL and (alphabet is None or set(t) <= alphabet)]
        if control:
            backend.add_special_tokens(control)
        vocab = backend.get_vocab(with_added_tokens=True)
        user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
                if k == _USER_DEFINED and t in vocab]
        if user:
            backend.add_tokens(user)

        special = {}
        for name, key in _GGUF_SPECIALS.items():
            token_id = fields.get(f"tokenizer.ggml.{key}")
            if token_id is not None:
                if not 0 <= token_id < len(tokens):
                    raise ValueError(f"tokenizer.ggml.{key} = {token_id} is outside the vocabulary of {len(tokens)}")
                special[name] = tokens[token_id]
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", model == "llama"))
        add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
        eos_id = fields.get("tokenizer.ggml.eos_token_id")
        tok = cls(backend, special, fields.get("tokenizer.chat_template"),
                  extra_stop_ids=() if eos_id is None else (eos_id,), add_bos_token=add_bos, add_eos_token=add_eos)
        bos, eos = special.get("bos_token"), special.get("eos_token")
        backend.post_processor = _bos_eos_processor(bos, tok.bos_token_id, eos, tok.eos_token_id, add_bos, add_eos)
        return tok

    @classmethod
    def from_dir(cls, path: str) -> Tokenizer:
        """Build from an HF directory: tokenizer.json, tokenizer_config.json, chat template files and
        generation_config.json (its EOS ids become stop ids)."""
        path = os.path.expanduser(path)
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"no tokenizer.json in {path}: xyjax needs an HF fast-tokenizer file")
        backend = _Backend.from_file(tokenizer_file)

        def optional(name: str) -> dict:
            file = os.path.join(path, name)
            return _read_json(file) if os.path.isfile(file) else {}

        config = optional("tokenizer_config.json")
        if "added_tokens_decoder" not in config:  # legacy layout: special tokens in special_tokens_map.json
            config = {**optional("special_tokens_map.json"), **config}
        special = {k: _token_content(v) for k, v in config.items() if k.endswith("_token") and _token_content(v)}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = [_token_content(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in extra if t and t not in added]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

        generation = optional("generation_config.json")
        eos_ids = generation.get("eos_token_id")
        eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        return cls(backend, special, cls._dir_chat_template(path, config), extra_stop_ids=eos_ids,
                   clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
                   add_bos_token=bool(config.get("add_bos_token", False)),
                   add_eos_token=bool(config.get("add_eos_token", False)))

    @staticmethod
    def _dir_chat_template(path: str, config: dict) -> str | dict[str, str] | None:
        """chat_template.jinja (+ additional_chat_templates/*.jinja) > tokenizer_config.json > chat_template.json."""
        templates = {}
        default = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(default):
            with open(default, encoding="utf-8") as f:
                templates["default"] = f.read()
        extra_dir = os.path.join(path, "additional_chat_templates")
        if os.path.isdir(extra_dir):
            for name in sorted(os.listdir(extra_dir)):
                if name.endswith(".jinja"):
                    with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                        templates[name.removesuffix(".jinja")] = f.read()
        if templates:
            return templates["default"] if list(templates) == ["default"] else templates
        template = config.get("chat_template")
        if template is None and os.path.isfile(os.path.join(path, "chat_template.json")):
            template = _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}
        return template

    def save(self, directory: str) -> None:
        """Write tokenizer.json and tokenizer_config.json: an HF-format tokenizer for ``from_dir`` and
        transformers' ``AutoTokenizer.from_pretrained`` (which then encodes identically)."""
        os.makedirs(directory, exist_ok=True)
        self.backend.save(os.path.join(directory, "tokenizer.json"))
        config = {
            # the generic class uses tokenizer.json as it is (a model-specific class may rebuild parts of it)
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
        }
        if self.chat_template is not None:
            template = self.chat_template
            if isinstance(template, dict):
                template = [{"name": k, "template": v} for k, v in template.items()]
            config["chat_template"] = template
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")

    # ---- vocabulary -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' ``len(tokenizer)``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    @property
    def bos_token_id(self) -> int | None:
        token = self.special_tokens.get("bos_token")
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        token = self.special_tokens.get("eos_token")
        return None if token is None else self.backend.token_to_id(token)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special added tokens (those ``skip_special_tokens`` drops)."""
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    @cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of ``<0xXX>`` tokens when the decoder joins them into UTF-8 (SentencePiece byte fallback)."""
        if "ByteFallback" not in repr(self.backend.decoder):
            return frozenset()
        vocab = self.backend.get_vocab(with_added_tokens=True)
        return frozenset(i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x") and t.endswith(">"))

    # ---- text <-> ids ---------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS/EOS where the tokenizer is set up to."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (ints or a 1-d integer array)."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":  # as transformers
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    # ---- chat -----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            *, tools: list[dict] | None = None, documents: list[dict] | None = None,
                            chat_template: str | None = None, continue_final_message: bool = False, **kwargs):
        """Render ``messages`` with the model's chat template as transformers does; ``tokenize`` returns ids
        (no BOS added: the template writes its own). ``continue_final_message`` leaves the last message open
        (needs ``add_generation_prompt=False``). Other ``kwargs`` are template variables."""
        template = self._select_template(chat_template, tools)
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are mutually exclusive")
        chat = []
        for m in messages:
            if not isinstance(m, dict):
                raise ValueError(f"chat messages must be dicts, got {m!r}")
            m = {k: v for k, v in m.items() if v is not None}  # transformers drops None-valued keys
            reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None),
                             None)
            if reasoning is not None:
                m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
            chat.append(m)
        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        if continue_final_message:
            final = chat[-1].get("content")
            if not isinstance(final, str):
                raise ValueError("continue_final_message needs a final message with string content")
            chat[-1]["content"] = final + tag
        text = _compile_template(template).render(
            messages=chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **kwargs})
        if continue_final_message:
            if final.strip() not in text or tag.strip() not in text:
                raise ValueError("continue_final_message: the chat template dropped the final message")
            at = text.rindex(tag.strip())
            text = text[:at] if text[at:at + len(tag)] == tag else text[:at].rstrip()
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _select_template(self, name_or_template: str | None, tools) -> str:
        templates = self.chat_template
        if isinstance(templates, dict):
            if name_or_template in templates:
                return templates[name_or_template]
            if name_or_template is not None:
                return name_or_template
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ValueError(f"the model has several chat templates and no default: pass one of {sorted(templates)}")
        if name_or_template is not None:
            return name_or_template
        if templates is None:
            raise ValueError("this model has no chat template (tokenizer.chat_template / chat_template.jinja); "
                             "pass chat_template=... or prompt with plain text")
        return templates


@lru_cache(maxsize=16)
def _compile_template(source: str):
    """Compile a chat template in the sandboxed jinja2 environment transformers uses."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")

    class Namespace(jinja2.utils.Namespace):
        """``namespace()`` that refuses underscore attributes."""

        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       namespace=Namespace)
    return env.from_string(source)


class IncrementalDetokenizer:
    """Streaming detokenization: ``add(token_id)`` returns the newly completed text, ``flush()`` the rest.

    Decodes a small window of recent tokens and emits only text past what was already emitted and before
    any trailing U+FFFD (an incomplete UTF-8 sequence, e.g. an emoji split across byte-level tokens).
    SentencePiece byte-fallback tokens (``<0x0A>``...) are held until a non-byte token closes their group,
    since their decoder replaces a whole invalid group. Once the window decodes cleanly it slides forward,
    keeping the tokens just read as context so leading spaces come out as in a full decode.

    Without prompt ids the deltas plus ``flush()`` concatenate to ``tokenizer.decode(generated_ids)``; with
    prompt ids, to the text the generated ids add after the prompt (the same, except that a SentencePiece
    first token keeps its leading space).
    """

    CONTEXT = 4  # prompt tokens kept as left context

    def __init__(self, tokenizer: Tokenizer, prompt_ids=None, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = [] if prompt_ids is None else [int(i) for i in prompt_ids]
        if skip_special_tokens:
            context = [i for i in context if i not in tokenizer.special_ids]
        self._ids = context[-self.CONTEXT:]
        self._start = 0  # window start (token index)
        self._read = len(self._ids)  # where the window's last clean decode ended
        self._done = len(self._window_text())  # characters of the window's text already emitted (or context)

    def _window_text(self) -> str:
        return self.tokenizer.decode(self._ids[self._start:], skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; returns the text it completes ('' while a character is still incomplete)."""
        token_id = int(token_id)
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""  # dropped, so the window always starts at a token that shows
        self._ids.append(token_id)
        if token_id in self.tokenizer.byte_fallback_ids:  # a byte group decodes (valid or not) once complete
            return ""
        text = self._window_text()
        stable = text.rstrip("\ufffd")
        delta = stable[self._done:]
        if len(stable) == len(text):  # clean end: slide the window, the tokens just read become context
            self._start, self._read = self._read, len(self._ids)
            self._done = len(self._window_text())
        elif len(stable) > self._done:
            self._done = len(stable)
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD, as in a full decode)."""
        text = self._window_text()
        delta = text[self._done:]
        self._done = max(self._done, len(text))
        return delta
