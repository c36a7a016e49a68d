"""Decoder language models (Hugging Face transformers): loading `transformers:NAME_OR_DIR[@REV]` and
local save_pretrained folders, and finding their decoder layers and sublayer units without
per-architecture name lists (DESIGN §8)."""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resprobe.errors import BadValue, ModelError

log = logging.getLogger("resprobe")
PREFIX = "transformers:"
GRANULARITIES = ("layer", "sublayer")


# Layer class -> the child whose input is the residual stream between the attention and the MLP update
# (h1). Classes not listed are derived from their children by :func:`mlp_entry`.
MLP_ENTRY: dict[str, str] = {
    "LlamaDecoderLayer": "post_attention_layernorm",
    "MistralDecoderLayer": "post_attention_layernorm",
    "Qwen2DecoderLayer": "post_attention_layernorm",
    "Qwen3DecoderLayer": "post_attention_layernorm",
    "Phi3DecoderLayer": "post_attention_layernorm",
    "MixtralDecoderLayer": "post_attention_layernorm",
    "Qwen2MoeDecoderLayer": "post_attention_layernorm",
    "Gemma2DecoderLayer": "pre_feedforward_layernorm",  # post_attention_layernorm is inside the branch
    "Gemma3DecoderLayer": "pre_feedforward_layernorm",
    "GPT2Block": "ln_2",
    "Olmo2DecoderLayer": "mlp",  # norms after each branch (inside it): the MLP reads h1 directly
    "GPTNeoXLayer": "post_attention_layernorm",  # only with use_parallel_residual=False
}


def split_spec(spec: str) -> tuple[str, str | None]:
    """``NAME_OR_DIR[@REVISION]`` of a ``transformers:`` spec (or a bare folder)."""
    body = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    if "@" in body and not Path(body).exists():
        name, revision = body.rsplit("@", 1)
        return name, revision or None
    return body, None


def _causal_architectures(config: dict[str, Any]) -> list[str]:
    return [a for a in config.get("architectures") or [] if a.endswith(("ForCausalLM", "LMHeadModel"))]


def is_lm_model(spec: str | None) -> bool:
    """MODEL names a transformers causal LM: the prefix, a folder whose config.json says so, or a
    resprobe checkpoint of one (``share`` of a language model). Reads a file at most."""
    if not spec:
        return False
    if spec.startswith(PREFIX):
        return True
    if Path(spec).expanduser().is_file():
        return lm_checkpoint_arch(spec) is not None
    config = Path(spec).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        return bool(_causal_architectures(json.loads(config.read_text())))
    except (OSError, ValueError, AttributeError):
        return False


def _needs_remote_code(config: dict[str, Any]) -> bool:
    auto_map = config.get("auto_map") or {}
    return any(key in auto_map for key in ("AutoModelForCausalLM", "AutoConfig", "AutoModel"))


@dataclass
class LoadedLM:
    spec: str
    name: str  # NAME_OR_DIR
    revision: str | None
    model: nn.Module
    tokenizer: Any  # a transformers tokenizer, or None when none was found
    tokenizer_name: str | None
    max_positions: int | None
    precision: str = "fp32"
    arch: dict[str, Any] | None = None  # how to build the model again (a resprobe checkpoint's; else from it)
    recipes: list[dict[str, Any]] = field(default_factory=list)  # restructurings applied (share)


def _local_config(name: str, spec: str, trust_remote_code: bool) -> dict[str, Any] | None:
    """The folder's config.json (checked), or None for a hub id."""
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if not looks_local:
        return None
    if not path.is_dir():
        raise ModelError(f"{spec}: {path} is not a folder (give a save_pretrained folder or a hub id)")
    if not (path / "config.json").is_file():
        raise ModelError(f"{spec}: {path} holds no config.json, so it is not a transformers model folder "
                         "(write one with save_pretrained)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{spec}: {path / 'config.json'} is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{spec}: {path / 'config.json'} is not a JSON object")
    if _needs_remote_code(config) and not trust_remote_code:
        raise ModelError(f"{spec} needs code from its own files (config.json auto_map) to load; pass "
                         "--trust-remote-code only if you trust that code")
    return config


def _load_error(spec: str, exc: BaseException, offline: bool) -> ModelError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "trust_remote_code" in str(exc):
        return ModelError(f"{spec} needs code from its repository to load; pass --trust-remote-code only if you "
                          "trust that code")
    if offline:
        return ModelError(f"{spec} could not be loaded from the local Hugging Face cache (--offline): {text}")
    return ModelError(f"{spec} could not be loaded: {text}")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def has_weights(folder: Path) -> bool:
    """Whether a local model folder holds weights (else it is a config to initialize, DESIGN §8)."""
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def load_lm(spec: str, tokenizer: str | None = None, precision: str = "fp32", offline: bool = False,
            trust_remote_code: bool = False, seed: int = 0) -> LoadedLM:
    """The model (eval mode, parameters frozen) and its tokenizer, as transformers loads them. A local
    folder with a config.json but no weights gives transformers' random initialization, seeded by
    ``seed`` (with a warning): ``finetune`` trains it from scratch."""
    if precision not in ("fp32", "bf16"):
        raise BadValue(f"--precision {precision!r}: language models run in fp32 or bf16")
    if not spec.startswith(PREFIX) and lm_checkpoint_arch(spec) is not None:
        return load_lm_checkpoint(Path(spec).expanduser(), tokenizer, precision, offline, trust_remote_code)
    name, revision = split_spec(spec)
    if not name:
        raise ModelError(f"{spec}: give a hub id or a folder after '{PREFIX}'")
    local = _local_config(name, spec, trust_remote_code)
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise ModelError("language models need the transformers package: pip install 'resprobe[llm]'") from None
    common = {"revision": revision, "local_files_only": offline, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(name, **common)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad id or folder
        raise _load_error(spec, exc, offline) from None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' own bars on stderr: resprobe has its own
    initialize = local is not None and not has_weights(Path(name).expanduser())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if initialize:
                with torch.random.fork_rng(devices=[]):  # the caller's global generator is left as it was
                    torch.manual_seed(seed)
                    model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                             trust_remote_code=trust_remote_code)
            else:
                model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype, **common)
    except Exception as exc:  # noqa: BLE001
        raise _load_error(spec, exc, offline) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if initialize:
        log.warning(f"{spec} holds no weights: the model is randomly initialized (seed {seed})")
    model.eval().requires_grad_(False)
    tok_name = tokenizer or name
    tok = load_tokenizer(tok_name, revision if tokenizer is None else None, offline, trust_remote_code)
    return LoadedLM(spec, name, revision, model, tok, tok_name, max_positions(model.config), precision)


# --------------------------------------------------------------------------------------------------
# resprobe checkpoints of language models (a shared LM: the base config, the recipe, the weights)


def lm_checkpoint_arch(path: str | Path) -> dict[str, Any] | None:
    """The ``arch`` of a resprobe checkpoint of a language model at ``path``; None for any other file.
    Memory-maps the file (``weights_only``): the weights are not read."""
    from resprobe.models.checkpoints import is_resprobe_checkpoint

    file = Path(path).expanduser()
    try:
        with open(file, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":  # torch.save's zip format (what resprobe writes)
                return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a checkpoint resprobe wrote: the vision path reports on it
        return None
    arch = obj.get("arch") if is_resprobe_checkpoint(obj) else None
    return dict(arch) if isinstance(arch, dict) and arch.get("source") == "transformers" else None


def _absolute_if_local(name: str | None) -> str | None:
    """A local folder as an absolute path (a checkpoint is read from anywhere); a hub id as it is."""
    if name is None:
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def lm_arch(loaded: LoadedLM, model: nn.Module) -> dict[str, Any]:
    """What rebuilds ``model``'s architecture without its original weights: the config as JSON, the
    attention implementation, and where the tokenizer is."""
    if loaded.arch is not None:  # already a resprobe checkpoint: the same base
        return dict(loaded.arch)
    config = model.config
    return {"source": "transformers", "spec": loaded.spec, "name": _absolute_if_local(loaded.name),
            "revision": loaded.revision, "tokenizer": _absolute_if_local(loaded.tokenizer_name),
            "config": json.loads(config.to_json_string()),
            "attn_implementation": getattr(config, "_attn_implementation", None)}


def save_lm_checkpoint(path: str | Path, loaded: LoadedLM, model: nn.Module, recipes: list[dict[str, Any]],
                       meta: dict[str, Any] | None = None, replace: bool = True,
                       extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a resprobe checkpoint (the format of docs/reference.md §6; ``arch.source``
    ``transformers``) that every command loads as MODEL (:func:`load_lm_checkpoint`). ``extra``: more
    top-level entries (``finetune``'s resume state)."""
    from resprobe import __version__
    from resprobe.models.checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, atomic_torch_save

    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
               "resprobe_version": __version__, "arch": json.loads(json.dumps(lm_arch(loaded, model))),
               "preprocessing": None, "recipes": json.loads(json.dumps(recipes)),
               "meta": json.loads(json.dumps(meta or {})),
               "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, **(extra or {})}
    atomic_torch_save(payload, path, replace)
    return Path(path)


def load_lm_checkpoint(path: Path, tokenizer: str | None = None, precision: str = "fp32", offline: bool = False,
                       trust_remote_code: bool = False) -> LoadedLM:
    """A language model from its resprobe checkpoint: built from the stored config (no download of the
    base weights), restructured by its recipes, then given the stored weights (all of them, strictly)."""
    from resprobe.models.checkpoints import read_checkpoint
    from resprobe.models.recipes import apply_recipe

    obj = read_checkpoint(path)
    arch, state = obj["arch"], obj.get("state_dict")
    if not isinstance(arch.get("config"), dict) or not isinstance(state, dict):
        raise ModelError(f"{path} is a resprobe checkpoint of a language model without its config or weights; "
                         "write it again with resprobe share")
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(arch["config"])
    try:
        config = AutoConfig.for_model(str(settings.pop("model_type")), **settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                attn_implementation=arch.get("attn_implementation"), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - an architecture this transformers does not know
        raise _load_error(str(path), exc, offline) from None
    recipes = list(obj.get("recipes") or [])
    for recipe in recipes:
        model = apply_recipe(model, recipe)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path}: its weights do not fit the model its recipe builds "
                         f"({str(exc).splitlines()[0]})") from None
    model.eval().requires_grad_(False)
    tok_name = tokenizer or arch.get("tokenizer")
    tok = load_tokenizer(tok_name, arch.get("revision") if tokenizer is None else None, offline,
                         trust_remote_code) if tok_name else None
    return LoadedLM(str(path), str(arch.get("name")), arch.get("revision"), model, tok, tok_name,
                    max_positions(model.config), precision, dict(arch), recipes)


def load_tokenizer(name: str, revision: str | None, offline: bool, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, local_files_only=offline,
                                             trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"no tokenizer could be loaded from {name} ({text}); give one with --tokenizer") from None


def text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def max_positions(config: Any) -> int | None:
    config = text_config(config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def layer_class(layer: nn.Module) -> type:
    """The decoder-layer class ``layer`` runs: its own, or for an iteration of a shared span (resprobe
    share, which holds its shared layer unregistered as ``shared_block``) the shared layer's."""
    return type(layer.__dict__.get("shared_block", layer))


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of ``num_hidden_layers`` decoder layers: the outermost ModuleList of that
    length whose members share one class (MoE expert lists live inside layers, so they lose)."""
    n = getattr(text_config(getattr(model, "config", None)), "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ModelError(f"{type(model).__name__}: its config has no num_hidden_layers, so resprobe cannot find its "
                         "decoder layers")
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) == n
                  and len({layer_class(m) for m in module}) == 1]
    outer = [(name, m) for name, m in candidates
             if not any(name.startswith(other + ".") for other, _ in candidates if other != name)]
    if len(outer) != 1:
        found = ", ".join(name for name, _ in outer) or "none"
        raise ModelError(f"{type(model).__name__}: expected one list of {n} decoder layers, found {found}")
    return outer[0]


def _parallel_residual(layer: nn.Module, config: Any) -> bool:
    for owner in (layer, text_config(config)):
        for key in ("use_parallel_residual", "parallel_attn", "parallel_residual"):
            if getattr(owner, key, False) is True:
                return True
    return False


def mlp_entry(layer: nn.Module, config: Any) -> str | None:
    """The child of ``layer`` whose input is h1 (between attention and MLP), or None where the layer
    has no such point (a parallel residual) or resprobe cannot tell."""
    if _parallel_residual(layer, config):
        return None
    children = dict(layer.named_children())
    name = MLP_ENTRY.get(layer_class(layer).__name__)
    if name is None:  # derived from the pre-norm pattern's child names
        if "pre_feedforward_layernorm" in children:
            name = "pre_feedforward_layernorm"
        elif "ln_1" in children and "ln_2" in children:
            name = "ln_2"
        elif ("input_layernorm" in children and "post_attention_layernorm" in children
              and "post_feedforward_layernorm" not in children):
            name = "post_attention_layernorm"
    return name if name in children else None


@dataclass
class LMUnit:
    """One residual unit: a whole decoder layer or its attention/MLP half (``part``)."""

    name: str
    index: int
    layer: nn.Module
    layer_index: int
    part: str  # "layer", "attn" or "mlp"
    hidden: int
    seq_len: int
    params: int
    stage: int = 0
    kind: str = "identity"

    def to_dict(self) -> dict[str, Any]:
        shape = [self.seq_len, self.hidden]
        return {"name": self.name, "stage": self.stage, "index": self.index, "kind": self.kind, "in_shape": shape,
                "out_shape": shape, "params": self.params}

    @property
    def is_identity(self) -> bool:
        return True


@dataclass
class LMAnatomy:
    model: nn.Module
    blocks: list[LMUnit]
    layers_name: str
    entries: dict[int, nn.Module] = field(default_factory=dict)  # layer index -> its MLP entry (sublayer)
    head: Any = None

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def __getitem__(self, name: str) -> LMUnit:
        for block in self.blocks:
            if block.name == name:
                return block
        raise KeyError(name)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def _sub_params(layer: nn.Module, entry: str) -> tuple[int, int]:
    """Parameters of the attention half (children before the MLP entry in registration order, norms
    included) and of the MLP half (the rest). Reported only; no statistic depends on it."""
    names = [n for n, _ in layer.named_children()]
    attn = {n for n in names if "attn" in n or "attention" in n or n in ("input_layernorm", "ln_1")}
    a = sum(_params(m) for n, m in layer.named_children() if n in attn)
    return a, _params(layer) - a


def lm_anatomy(model: nn.Module, seq_len: int, granularity: str = "layer") -> LMAnatomy:
    """The units of ``model`` in execution order (DESIGN §8 "Blocks")."""
    if granularity not in GRANULARITIES:
        raise BadValue(f"--granularity {granularity!r}: choose layer or sublayer")
    prefix, layers = decoder_layers(model)
    config = getattr(model, "config", None)
    hidden = int(getattr(text_config(config), "hidden_size", 0) or 0)
    units: list[LMUnit] = []
    entries: dict[int, nn.Module] = {}
    for i, layer in enumerate(layers):
        name = f"{prefix}.{i}"
        entry = mlp_entry(layer, config) if granularity == "sublayer" else None
        if entry is None:
            if granularity == "sublayer" and "shared_block" in layer.__dict__:
                raise BadValue(f"--granularity sublayer: {name} runs a shared layer whose norms are shared too "
                               "(share --norm shared), so its attention and MLP updates cannot be told apart per "
                               "iteration (use --granularity layer)")
            if granularity == "sublayer" and not _parallel_residual(layer, config):
                raise BadValue(f"--granularity sublayer: resprobe does not know where the attention update ends in "
                               f"{type(layer).__name__} (use --granularity layer)")
            units.append(LMUnit(name, len(units), layer, i, "layer", hidden, seq_len, _params(layer)))
            continue
        entries[i] = getattr(layer, entry)
        pa, pm = _sub_params(layer, entry)
        units.append(LMUnit(f"{name}:attn", len(units), layer, i, "attn", hidden, seq_len, pa))
        units.append(LMUnit(f"{name}:mlp", len(units), layer, i, "mlp", hidden, seq_len, pm))
    return LMAnatomy(model, units, prefix, entries)


def perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(loss) if loss < 700 else math.inf
