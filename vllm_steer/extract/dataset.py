"""Contrastive datasets: persona templates, suffix expansion, chat/thinking prompts, YAML configs.

A dataset is a list of ``(positive, negative)`` prompt pairs that differ only in a
persona. From a config, each pair is built as::

    instruction = template.replace("{persona}", persona)        # user turn
    prompt      = chat_template([system?, user: instruction], add_generation_prompt=True)
                  [+ think_open]                                 # style: thinking only
                  + suffix                                       # start of the reply

with ``suffix`` running over the token prefixes of every opener in the suffix set
("I think" -> "I", "I think"). ``style: plain`` needs no chat template:
``instruction + separator + suffix``. A plain list of ``(positive, negative)`` strings
(repeng's format) is used as-is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from vllm_steer.extract.methods import METHODS
from vllm_steer.thinking import markers_for, native_markers

STYLES = ("chat", "thinking", "plain")
PERSONA = "{persona}"
DEFAULT_TEMPLATES = {
    "chat": "Act as if you're extremely {persona}.",
    "thinking": "Pretend you're {persona}. You think step by step consistent with your identity.",
    "plain": "Act as if you're extremely {persona}.",
}
SUFFIX_SETS = {"chat": "suffixes_chat.txt", "reasoning": "suffixes_reasoning.txt"}
NORMALIZE = ("unit", "none")
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


class DatasetError(ValueError):
    """A dataset or vector config is invalid; the message says what to fix. ``field``
    names the config key at fault when there is one (the training route's 400s)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


# -- pairs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContrastivePair:
    positive: str
    negative: str


@dataclass(frozen=True)
class ContrastiveDataset:
    """Prompt pairs plus how to tokenize them.

    ``add_special_tokens`` is False for prompts rendered by a chat template (the template
    already wrote BOS etc.) and True for raw strings. ``info`` is free-form provenance
    (style, personas, suffix set) copied into the vector's metadata.
    """

    pairs: tuple[ContrastivePair, ...]
    add_special_tokens: bool = True
    name: str = ""
    info: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pairs", tuple(self.pairs))
        if not self.pairs:
            what = f"dataset {self.name!r}" if self.name else "dataset"
            raise DatasetError(f"{what} is empty: it has no (positive, negative) pairs")
        for k, p in enumerate(self.pairs):
            if not isinstance(p.positive, str) or not isinstance(p.negative, str):
                raise DatasetError(f"pair {k}: positive and negative must be strings")
            if not p.positive or not p.negative:
                raise DatasetError(f"pair {k} has an empty prompt")
        if all(p.positive == p.negative for p in self.pairs):
            raise DatasetError("every pair has identical positive and negative prompts; "
                               "there is nothing to contrast")

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def positives(self) -> list[str]:
        return [p.positive for p in self.pairs]

    @property
    def negatives(self) -> list[str]:
        return [p.negative for p in self.pairs]

    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the exact prompt strings and tokenization flag."""
        payload = json.dumps(
            {"add_special_tokens": self.add_special_tokens,
             "pairs": [[p.positive, p.negative] for p in self.pairs]},
            ensure_ascii=False, separators=(",", ":"),
        )
        return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class PromptSets:
    """Two unpaired prompt lists (e.g. harmful vs harmless instructions, rendered): the data
    of the refusal-direction recipe, a difference of means of last-token activations.
    ``add_special_tokens``/``info`` as in ``ContrastiveDataset``."""

    positives: tuple[str, ...]
    negatives: tuple[str, ...]
    add_special_tokens: bool = True
    name: str = ""
    info: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "positives", tuple(self.positives))
        object.__setattr__(self, "negatives", tuple(self.negatives))
        for which, items in (("positives", self.positives), ("negatives", self.negatives)):
            if not items:
                raise DatasetError(f"prompt sets: '{which}' is empty")
            bad = [k for k, x in enumerate(items) if not isinstance(x, str) or not x.strip()]
            if bad:
                raise DatasetError(f"prompt sets: {which}[{bad[0]}] must be a non-empty string")

    def __len__(self) -> int:
        return len(self.positives) + len(self.negatives)

    def fingerprint(self) -> str:
        payload = json.dumps({"add_special_tokens": self.add_special_tokens,
                              "positives": list(self.positives),
                              "negatives": list(self.negatives)},
                             ensure_ascii=False, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def build_prompt_sets(tokenizer, positives: Sequence[str], negatives: Sequence[str], *,
                      fmt: PromptFormat | None = None, name: str = "") -> PromptSets:
    """Prompt sets with every instruction rendered as a user turn with the generation prompt
    open (``style: chat``/``thinking``), or as raw text (``style: plain``)."""
    fmt = fmt or PromptFormat()
    if fmt.style == "plain":
        return PromptSets(tuple(positives), tuple(negatives), add_special_tokens=True,
                          name=name, info={"style": "plain", "data": "prompt sets"})
    check_chat_template(tokenizer, fmt)
    render = [render_generation_prompt(tokenizer, x, fmt) for x in (*positives, *negatives)]
    n = len(positives)
    return PromptSets(tuple(render[:n]), tuple(render[n:]), add_special_tokens=False,
                      name=name, info={"style": fmt.style, "data": "prompt sets"})


def _to_pair(item: Any, k: int) -> ContrastivePair:
    if isinstance(item, ContrastivePair):
        return item
    if isinstance(item, Mapping):
        if "positive" not in item or "negative" not in item:
            raise DatasetError(f"pair {k}: a mapping needs 'positive' and 'negative' keys")
        return ContrastivePair(item["positive"], item["negative"])
    if hasattr(item, "positive") and hasattr(item, "negative"):  # repeng.DatasetEntry
        return ContrastivePair(item.positive, item.negative)
    if isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
        return ContrastivePair(item[0], item[1])
    raise DatasetError(f"pair {k}: expected (positive, negative), got {item!r:.100}")


def as_dataset(data: Any, *, add_special_tokens: bool = True, name: str = "") -> ContrastiveDataset:
    """A ``ContrastiveDataset`` from one, or from an iterable of pairs (tuples, lists,
    ``{"positive", "negative"}`` mappings or objects with those attributes, e.g. repeng's
    ``DatasetEntry``). Raw strings are tokenized with ``add_special_tokens``."""
    if isinstance(data, ContrastiveDataset):
        return data
    if data is None or isinstance(data, str | bytes):
        raise DatasetError(f"expected a list of (positive, negative) pairs, got {type(data)}")
    pairs = tuple(_to_pair(item, k) for k, item in enumerate(data))
    return ContrastiveDataset(pairs, add_special_tokens=add_special_tokens, name=name,
                              info={"style": "pairs"})


def load_pairs_file(path: str | os.PathLike[str]) -> list[ContrastivePair]:
    """Pairs from ``.json`` (a list), ``.jsonl`` (one pair a line) or ``.yaml``: each pair is
    ``[positive, negative]`` or ``{positive: ..., negative: ...}``."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"pairs file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif p.suffix == ".json":
            items = json.loads(text)
        else:
            items = yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise DatasetError(f"{p}: cannot parse pairs ({e})") from e
    if isinstance(items, Mapping) and "pairs" in items:
        items = items["pairs"]
    if not isinstance(items, list):
        raise DatasetError(f"{p}: expected a list of pairs")
    try:
        return [_to_pair(item, k) for k, item in enumerate(items)]
    except DatasetError as e:
        raise DatasetError(f"{p}: {e}") from e


# -- suffixes ---------------------------------------------------------------------------------
def _read_lines(text: str) -> list[str]:
    return [ln.rstrip("\n") for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def load_suffixes(
    spec: str | Sequence[str], *, base_dir: str | os.PathLike[str] = "."
) -> list[str]:
    """Suffix openers from a shipped set name (``chat``, ``reasoning``), a text file (one
    per line, ``#`` comments; relative to ``base_dir``) or a list of strings."""
    if isinstance(spec, str):
        if spec in SUFFIX_SETS:
            text = resources.files("vllm_steer").joinpath("data", SUFFIX_SETS[spec]).read_text(
                encoding="utf-8")
        else:
            p = Path(spec) if Path(spec).is_absolute() else Path(base_dir) / spec
            if not p.is_file():
                raise DatasetError(f"suffix set {spec!r} is neither a shipped set "
                                   f"({', '.join(SUFFIX_SETS)}) nor a file ({p} not found)")
            text = p.read_text(encoding="utf-8")
        items = _read_lines(text)
    else:
        items = [str(s) for s in spec]
    items = [s for s in items if s.strip()]
    if not items:
        raise DatasetError(f"suffix set {spec!r:.80} is empty")
    return items


def expand_suffixes(tokenizer, suffixes: Iterable[str]) -> list[str]:
    """Every token prefix of every suffix (``"I think"`` -> ``"I"``, ``"I think"``),
    de-duplicated in first-seen order. Prefixes that end inside a multi-byte character
    (decode to U+FFFD) are skipped."""
    out: dict[str, None] = {}
    for s in suffixes:
        ids = tokenizer.encode(s, add_special_tokens=False)
        for i in range(1, len(ids) + 1):
            text = tokenizer.decode(ids[:i], clean_up_tokenization_spaces=False)
            if text.strip() and "\ufffd" not in text:
                out.setdefault(text, None)
    return list(out)


# -- prompt rendering ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptFormat:
    """How an instruction and a reply opener become one prompt string (see module doc)."""

    style: str = "chat"
    system_prompt: str | None = None
    #: Text that opens / closes the thinking section; None: the tokenizer's own markers
    #: (``vllm_steer.thinking``), else ``<think>``/``</think>``. ``think_open`` gets a newline.
    think_open: str | None = None
    think_close: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    separator: str = "\n"  # style "plain" only

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise DatasetError(f"style must be one of {', '.join(STYLES)}, got {self.style!r}")
        if self.think_open is not None and not self.think_open:
            raise DatasetError("think_open must be a non-empty marker (or null for the model's)")

    def markers(self, tokenizer) -> tuple[str, str]:
        """``(think_open, think_close)`` for ``tokenizer``: explicit, else its native markers."""
        start, end = markers_for(tokenizer)
        return (self.think_open if self.think_open is not None else start + "\n",
                self.think_close if self.think_close is not None else end)


def check_chat_template(tokenizer, fmt: PromptFormat) -> None:
    """Raise ``DatasetError`` if ``fmt`` needs a chat template the tokenizer lacks."""
    if fmt.style in ("chat", "thinking") and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DatasetError(
            f"style {fmt.style!r} needs a chat template, but the tokenizer of {name} has none; "
            "use 'style: plain' (instruction + separator + suffix) or a pairs list instead"
        )


def render_generation_prompt(tokenizer, instruction: str, fmt: PromptFormat) -> str:
    """The text up to where the assistant's reply (or, for ``thinking``, its thinking) starts."""
    if fmt.style == "plain":
        return instruction + fmt.separator
    check_chat_template(tokenizer, fmt)
    messages = []
    if fmt.system_prompt is not None:
        messages.append({"role": "system", "content": fmt.system_prompt})
    messages.append({"role": "user", "content": instruction})
    kwargs = dict(fmt.chat_template_kwargs)
    if fmt.style == "thinking":
        kwargs.setdefault("enable_thinking", True)  # Qwen3-style switch; ignored elsewhere
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **kwargs)
    if fmt.style != "thinking":
        return text
    # Open the thinking section unless the template already did (templates of models with
    # a native thinking mode may; by hand only otherwise).
    think_open, think_close = fmt.markers(tokenizer)
    if text.endswith(think_open):
        return text
    stripped = think_open.rstrip()
    if stripped and text.endswith(stripped):
        return text + think_open[len(stripped):]
    if think_close and text.rstrip().endswith(think_close.strip()):
        raise DatasetError(
            f"the chat template's generation prompt already closes the thinking section "
            f"({text[-60:]!r}); pass chat_template_kwargs that enable thinking"
        )
    return text + think_open


def render_prompt(tokenizer, instruction: str, suffix: str, fmt: PromptFormat) -> str:
    """Full prompt: generation prompt (+ think marker) + ``suffix``."""
    return render_generation_prompt(tokenizer, instruction, fmt) + suffix


def fill_template(template: str, persona: str) -> str:
    if PERSONA not in template:
        raise DatasetError(f"template {template!r} has no {PERSONA} placeholder")
    return template.replace(PERSONA, persona)


def build_persona_dataset(
    tokenizer,
    personas: Sequence[tuple[str, str]],
    suffixes: Sequence[str],
    *,
    template: str | None = None,
    fmt: PromptFormat | None = None,
    expand: bool = True,
    name: str = "",
) -> ContrastiveDataset:
    """Pairs for every (positive, negative) persona and every (expanded) suffix."""
    fmt = fmt or PromptFormat()
    template = template if template is not None else DEFAULT_TEMPLATES[fmt.style]
    if PERSONA not in template:
        raise DatasetError(f"template {template!r} has no {PERSONA} placeholder")
    if not personas:
        raise DatasetError("no personas given: need at least one [positive, negative] pair")
    check_chat_template(tokenizer, fmt)
    openers = expand_suffixes(tokenizer, suffixes) if expand else list(suffixes)
    if not openers:
        raise DatasetError("the suffix set is empty")
    pairs = []
    for pos, neg in personas:
        head_pos = render_generation_prompt(tokenizer, fill_template(template, pos), fmt)
        head_neg = render_generation_prompt(tokenizer, fill_template(template, neg), fmt)
        pairs.extend(ContrastivePair(head_pos + s, head_neg + s) for s in openers)
    info = {"style": fmt.style, "template": template,
            "personas": json.dumps([list(p) for p in personas]),
            "num_suffixes": str(len(suffixes)), "num_openers": str(len(openers))}
    if fmt.style == "thinking":
        info["think_open"] = fmt.markers(tokenizer)[0]
        info["think_markers"] = ("native" if native_markers(tokenizer) is not None
                                 else "inserted by hand (no native thinking mode)")
    return ContrastiveDataset(tuple(pairs), add_special_tokens=fmt.style == "plain", name=name,
                              info=info)


# -- YAML configs -------------------------------------------------------------------------------
_CONFIG_KEYS = {
    "name", "description", "model", "style", "template", "personas", "suffixes",
    "expand_suffixes", "max_suffixes", "system_prompt", "think_open", "think_close",
    "chat_template_kwargs", "separator", "pairs", "pairs_file", "layers", "method",
    "normalize", "batch_size", "dtype", "output", "positive_prompts", "negative_prompts",
    "direction_from_layer",
}


@dataclass
class VectorConfig:
    """A vector recipe (``configs/vectors/*.yaml``). Paths in it (``suffixes`` files,
    ``pairs_file``, ``output``) are relative to ``base_dir``, the config's directory."""

    name: str
    description: str = ""
    model: str | None = None
    style: str = "chat"
    template: str | None = None
    personas: list[tuple[str, str]] = field(default_factory=list)
    suffixes: str | list[str] = "chat"
    expand_suffixes: bool = True
    max_suffixes: int | None = None
    system_prompt: str | None = None
    think_open: str | None = None
    think_close: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    separator: str = "\n"
    pairs: list[ContrastivePair] | None = None
    #: Unpaired prompt lists (refusal-direction style data; ``method: mean_diff`` only).
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    layers: str | list[int] | None = None
    #: Use the direction found at this layer for every layer (directional ablation).
    direction_from_layer: int | None = None
    method: str = "pca_center"
    normalize: str = "unit"
    batch_size: int = 32
    dtype: str = "float32"
    output: str | None = None
    base_dir: str = "."

    @property
    def prompt_format(self) -> PromptFormat:
        return PromptFormat(style=self.style, system_prompt=self.system_prompt,
                            think_open=self.think_open, think_close=self.think_close,
                            chat_template_kwargs=dict(self.chat_template_kwargs),
                            separator=self.separator)


def _parse_personas(raw: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise DatasetError(f"{where}: 'personas' must be a non-empty list of [positive, negative]")
    out = []
    for k, item in enumerate(raw):
        if isinstance(item, Mapping):
            item = [item.get("positive"), item.get("negative")]
        if (not isinstance(item, list | tuple) or len(item) != 2
                or not all(isinstance(x, str) and x.strip() for x in item)):
            raise DatasetError(f"{where}: personas[{k}] must be [positive, negative] strings, "
                               f"got {item!r}")
        out.append((item[0], item[1]))
    return out


def check_layers_spec(spec: Any, where: str = "layers") -> None:
    """Validate the form of a layer spec (range checks need the model: ``train.resolve_layers``)."""
    if spec is None or spec == "all":
        return
    if isinstance(spec, str):
        parts = spec.split(":")
        if len(parts) in (2, 3) and all(p.strip().lstrip("-").isdigit() or not p.strip()
                                         for p in parts):
            return
    elif isinstance(spec, list) and spec and all(
            isinstance(x, int) and not isinstance(x, bool) for x in spec):
        return
    raise DatasetError(f"{where}: expected 'all', 'start:stop[:step]' or a list of ints, "
                       f"got {spec!r}")


def load_config(path: str | os.PathLike[str]) -> VectorConfig:
    """Read and validate a vector config. Nothing is tokenized or run here."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"config {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DatasetError(f"{p}: invalid YAML ({e})") from e
    if not isinstance(raw, Mapping):
        raise DatasetError(f"{p}: expected a mapping at the top level")
    cfg = config_from_mapping(raw, base_dir=str(p.parent), where=str(p), default_name=p.stem)
    if cfg.output is not None:
        cfg.output = str(p.parent / cfg.output)
    return cfg


#: Recipe keys that name files (read relative to the config's directory).
FILE_KEYS = ("pairs_file",)


def config_from_mapping(raw: Mapping[str, Any], *, base_dir: str = ".", where: str = "recipe",
                        default_name: str = "", allow_files: bool = True) -> VectorConfig:
    """A validated ``VectorConfig`` from a recipe mapping (a YAML config's content, or
    the same as JSON). ``allow_files=False`` (recipes from the network) refuses every
    field that would read a file: suffix sets must be shipped names or lists, prompt sets
    lists, no ``pairs_file``. Errors are ``DatasetError`` with ``field`` set."""
    def err(key: str, message: str) -> DatasetError:
        return DatasetError(f"{where}: {message}", field=key)

    unknown = sorted(str(k) for k in set(raw) - _CONFIG_KEYS)
    if unknown:
        raise err(unknown[0], f"unknown keys {unknown}; allowed: {sorted(_CONFIG_KEYS)}")
    name = raw.get("name") or default_name
    if not isinstance(name, str) or not name:
        raise err("name", "'name' must be a non-empty string")
    cfg = VectorConfig(name=name, base_dir=base_dir)
    for key in ("description", "model", "system_prompt", "output", "dtype", "separator"):
        if raw.get(key) is not None:
            if not isinstance(raw[key], str | int | float) or isinstance(raw[key], bool):
                raise err(key, f"{key} must be a string")
            setattr(cfg, key, str(raw[key]))
    cfg.style = str(raw.get("style", "chat"))
    if cfg.style not in STYLES:
        raise err("style", f"style must be one of {', '.join(STYLES)}, got {cfg.style!r}")
    if cfg.dtype not in DTYPE_NAMES:
        raise err("dtype", f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {cfg.dtype!r}")
    cfg.method = str(raw.get("method", cfg.method))
    if cfg.method not in METHODS:
        raise err("method", f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    cfg.normalize = str(raw.get("normalize", cfg.normalize))
    if cfg.normalize not in NORMALIZE:
        raise err("normalize", f"normalize must be one of {', '.join(NORMALIZE)}")
    batch = raw.get("batch_size", cfg.batch_size)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise err("batch_size", "batch_size must be an integer >= 1")
    cfg.batch_size = batch
    cfg.layers = raw.get("layers")
    try:
        check_layers_spec(cfg.layers, f"{where}: layers")
    except DatasetError as e:
        raise DatasetError(str(e), field="layers") from None
    dfl = raw.get("direction_from_layer")
    if dfl is not None and (isinstance(dfl, bool) or not isinstance(dfl, int)):
        raise err("direction_from_layer", "direction_from_layer must be a layer index")
    cfg.direction_from_layer = dfl
    for key in ("think_open", "think_close"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise err(key, f"{key} must be a non-empty string (or omitted: the model's own "
                           "thinking markers)")
        setattr(cfg, key, value)
    ctk = raw.get("chat_template_kwargs") or {}
    if not isinstance(ctk, Mapping):
        raise err("chat_template_kwargs", "chat_template_kwargs must be a mapping")
    cfg.chat_template_kwargs = dict(ctk)
    exp = raw.get("expand_suffixes", True)
    if not isinstance(exp, bool):
        raise err("expand_suffixes", "expand_suffixes must be true or false")
    cfg.expand_suffixes = exp
    if raw.get("max_suffixes") is not None:
        ms = raw["max_suffixes"]
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 1:
            raise err("max_suffixes", "max_suffixes must be an integer >= 1")
        cfg.max_suffixes = ms
    if not allow_files:
        for key in FILE_KEYS:
            if raw.get(key) is not None:
                raise err(key, f"{key} names a file; recipes sent to the server must carry "
                               "their data inline")

    has_sets = raw.get("positive_prompts") is not None or raw.get("negative_prompts") is not None
    if has_sets:
        others = [k for k in ("personas", "pairs", "pairs_file") if raw.get(k) is not None]
        if others:
            raise err(others[0], f"give either positive_prompts/negative_prompts or "
                                 f"'{others[0]}', not both")
        if cfg.method != "mean_diff":
            raise err("method", f"prompt sets are unpaired: method must be 'mean_diff' "
                                f"(got {cfg.method!r})")
        for key in ("positive_prompts", "negative_prompts"):
            items = raw.get(key)
            if isinstance(items, str):   # a file of prompts, one per line
                if not allow_files:
                    raise err(key, f"{key} names a file; recipes sent to the server must "
                                   "carry their prompts inline (a list)")
                items = load_suffixes(items, base_dir=cfg.base_dir)
            if not isinstance(items, list) or not items or not all(
                    isinstance(x, str) and x.strip() for x in items):
                raise err(key, f"'{key}' must be a non-empty list of prompts or a file with "
                               "one prompt per line")
            setattr(cfg, key, list(items))
        return cfg
    has_pairs = raw.get("pairs") is not None or raw.get("pairs_file") is not None
    if has_pairs:
        if raw.get("personas") is not None:
            raise err("personas", "give either 'personas' or 'pairs'/'pairs_file', not both")
        items: list[ContrastivePair] = []
        if raw.get("pairs") is not None:
            if not isinstance(raw["pairs"], list):
                raise err("pairs", "'pairs' must be a list of [positive, negative]")
            try:
                items += [_to_pair(x, k) for k, x in enumerate(raw["pairs"])]
            except DatasetError as e:
                raise err("pairs", str(e)) from e
            bad = [k for k, x in enumerate(items)
                   if not isinstance(x.positive, str) or not isinstance(x.negative, str)]
            if bad:
                raise err("pairs", f"pair {bad[0]}: positive and negative must be strings")
        if raw.get("pairs_file") is not None:
            items += load_pairs_file(Path(base_dir) / str(raw["pairs_file"]))
        if not items:
            raise err("pairs", "the dataset is empty ('pairs' has no entries)")
        cfg.pairs = items
        return cfg

    try:
        cfg.personas = _parse_personas(raw.get("personas"), where)
    except DatasetError as e:
        raise DatasetError(str(e), field="personas") from None
    default_template = DEFAULT_TEMPLATES[cfg.style]
    template = raw.get("template")
    if template is not None and not isinstance(template, str):
        raise err("template", "template must be a string")
    cfg.template = template if template is not None else default_template
    if PERSONA not in cfg.template:
        raise err("template", f"template {cfg.template!r} has no {PERSONA} placeholder")
    sfx = raw.get("suffixes", "reasoning" if cfg.style == "thinking" else "chat")
    if isinstance(sfx, list) and not all(isinstance(x, str) for x in sfx):
        raise err("suffixes", "'suffixes' list entries must be strings")
    if not isinstance(sfx, str | list):
        raise err("suffixes", "'suffixes' must be a set name, a file or a list")
    if not allow_files and isinstance(sfx, str) and sfx not in SUFFIX_SETS:
        raise err("suffixes", f"{sfx!r} is not a shipped suffix set ({', '.join(SUFFIX_SETS)});"
                              " recipes sent to the server give a set name or a list")
    try:
        load_suffixes(sfx, base_dir=cfg.base_dir)  # fail early on a missing/empty set
    except DatasetError as e:
        raise DatasetError(str(e), field="suffixes") from None
    cfg.suffixes = sfx
    return cfg


def build_dataset(cfg: VectorConfig, tokenizer) -> ContrastiveDataset | PromptSets:
    """The dataset a config describes, rendered with ``tokenizer``'s chat template."""
    if cfg.positive_prompts is not None:
        return build_prompt_sets(tokenizer, cfg.positive_prompts, cfg.negative_prompts or [],
                                 fmt=cfg.prompt_format, name=cfg.name)
    if cfg.pairs is not None:
        return as_dataset(cfg.pairs, add_special_tokens=True, name=cfg.name)
    suffixes = load_suffixes(cfg.suffixes, base_dir=cfg.base_dir)
    if cfg.max_suffixes is not None:
        suffixes = suffixes[: cfg.max_suffixes]
    ds = build_persona_dataset(tokenizer, cfg.personas, suffixes, template=cfg.template,
                               fmt=cfg.prompt_format, expand=cfg.expand_suffixes, name=cfg.name)
    ds.info["suffixes"] = cfg.suffixes if isinstance(cfg.suffixes, str) else "inline"
    return ds
