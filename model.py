"""FunctionCallingModel: a frozen causal LM, its tool memory (tool_memory.ToolMemory: one trainable row per tool)
and optional LoRA.

Every tool is one special token of the tokenizer (Llama-3's reserved special tokens, in id order, then new special
tokens for the tools past them or when the tokenizer has none; the embedding and LM head grow by those). The tool's
rows replace that token's embedding on the input side and its logit on the output side (`logit = hidden . row`),
both vectorized over all tools. The rows and the LoRA adapter are the whole
trainable state, and a checkpoint holds exactly that (safetensors + JSON), never backbone weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import save_file
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from common import (UserError, atomic_write_json, atomic_write_text, atomic_write_with, first_line, read_json,
                    read_safetensors)
from dataset import IGNORE_INDEX, end_of_turn_id
from decoding import (CallBoundaryTracker, OfferedTools, ScoreProcessor, ToolForcingProcessor, greedy_decode,
                      left_pad_positions)
from tool_memory import MEMORY_DTYPES, ToolMemory

logger = logging.getLogger(__name__)

RESERVED_TOKEN_PATTERN = re.compile(r"^<\|reserved_special_token_(\d+)\|>$")
ADDED_TOOL_TOKEN = "<|tool_memory_{}|>"
MEMORY_FILE = "tool_memory.safetensors"
MEMORY_META_FILE = "tool_memory.json"
LORA_DIR = "lora"
STOP_TOKENS = ("eot", "generation_config")
TRAINING_PASSES = ("auto", "split", "one")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; `layer_indices` restricts LoRA to some decoder layers (negative = from the end)."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    layer_indices: Sequence[int] | None = None


@dataclass
class CallingOutput:
    """Forward result: full-vocabulary logits (tool columns from the rows) and the losses when labels are given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    tool_loss: torch.Tensor | None = None
    past_key_values: object | None = None
    num_tool_targets: torch.Tensor | None = None  # how many targets the tool loss averages (with labels)


@dataclass
class GeneratedCalls:
    """One generated answer, parsed."""

    predicted_tools: list[str]
    function_calls: list[str]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    untooled_text: str | None = None  # an answer with no tool token: its text (the original scores it as one call)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`auto` (or None) picks CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device: expected auto, cpu, cuda or cuda:N, got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute dtype: bfloat16 on CUDA, float32 on CPU, unless given (`auto` means the same)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype: expected one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_training_pass(training_pass: str, device: torch.device) -> str:
    """How a training batch runs through the decoder (FunctionCallingModel.training_hidden): `split` (the prompt
    without autograd, then the answer on its cache: two decoder calls) or `one` (one pass). `auto` is one pass on
    CUDA, where the bench measured a split step at 1.36-1.54x a plain one on an H100 (two launch-bound decoder calls),
    and split elsewhere, where it is 0.58-0.63x a plain step on CPU. The rule is a default to be measured on a GPU
    (`bench/bench_tool_memory.py --training_pass one`): the one-pass ratio there has not been measured yet."""
    if training_pass not in TRAINING_PASSES:
        raise UserError(f"--training_pass: expected one of {', '.join(TRAINING_PASSES)}, got {training_pass!r}")
    if training_pass == "auto":
        return "one" if device.type == "cuda" else "split"
    return training_pass


def check_model_name(model_name: str) -> None:
    """A --model_name that names a local place must be a model directory: a missing one is reported as missing (not
    as the hub's repo-id format error it would otherwise give). `org/name` with no such local directory is a hub id."""
    path = Path(model_name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise UserError(f"--model_name {model_name!r} is a file, not a model directory")
    if path.is_absolute() or model_name.startswith((".", "~")) or len(path.parts) > 2 or model_name.endswith("/"):
        raise UserError(f"--model_name {model_name!r}: the directory does not exist")


def model_positions(model_name: str) -> int | None:
    """The number of positions the model was built for (None when its config does not say), from its config alone."""
    check_model_name(model_name)
    try:
        config = AutoConfig.from_pretrained(model_name)
    except Exception as err:  # noqa: BLE001 - any loader failure is reported as one line naming the model
        raise UserError(f"cannot load --model_name {model_name!r}: {first_line(err)}") from None
    return getattr(config, "max_position_embeddings", None)


def load_tokenizer(model_name: str):
    """Load a tokenizer; a missing or unreadable model directory is a one-line error."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
    except Exception as err:  # noqa: BLE001 - any loader failure is reported as one line naming the model
        raise UserError(f"cannot load the tokenizer of --model_name {model_name!r}: {first_line(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer



def reserved_token_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's `<|reserved_special_token_N|>` tokens, ordered by N."""
    found = []
    for token, token_id in tokenizer.get_vocab().items():
        match = RESERVED_TOKEN_PATTERN.match(token)
        if match:
            found.append((int(match.group(1)), token_id))
    return [token_id for _, token_id in sorted(found)]


def assign_tool_tokens(tokenizer, num_tools: int) -> tuple[list[int], bool]:
    """Token ids for `num_tools` tools and whether tokens were added (the vocabulary then needs resizing).

    A Llama-3 style tokenizer offers its reserved special tokens as the first tool slots, in id order; every tool
    past them (and every tool of a tokenizer without reserved tokens, GPT-2 or Qwen) gets a new special token
    `<|tool_memory_N|>`, N counting from 0 over the added ones. The same tokenizer and tool count give the same ids
    in every process and every load, so a checkpoint's token ids stay valid.
    """
    reserved = reserved_token_ids(tokenizer)[:num_tools]
    extra = num_tools - len(reserved)
    if extra == 0:
        return reserved, False
    new_tokens = [ADDED_TOOL_TOKEN.format(i) for i in range(extra)]
    tokenizer.add_tokens(new_tokens, special_tokens=True)
    return reserved + [tokenizer.convert_tokens_to_ids(t) for t in new_tokens], True


def check_backbone(model_name: str, lora: LoraSettings | None) -> None:
    """What can be known of the backbone before any data is read: LoRA's target modules and layers exist in the
    model (built from its config on the meta device, no weights loaded). Any number of tools fits (assign_tool_tokens)."""
    if lora is None:
        return
    try:
        config = AutoConfig.from_pretrained(model_name)
        with torch.device("meta"), _quiet_loading():
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as err:  # noqa: BLE001 - any loader failure is reported as one line naming the model
        raise UserError(f"cannot load --model_name {model_name!r}: {first_line(err)}") from None
    names = [name for name, _ in skeleton.named_modules()]
    unknown = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        raise UserError(f"--lora_target_modules: {', '.join(unknown)} not found in --model_name {model_name}; the "
                        f"model's modules LoRA can adapt: {', '.join(lora_capable_modules(skeleton))}")
    layers = config.num_hidden_layers
    outside = [i for i in lora.layer_indices or () if not -layers <= i < layers]
    if outside:
        raise UserError(f"--lora_layer_indices: {outside[0]} is outside the model's {layers} layers")


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide transformers' per-tensor "Loading weights" bar and peft's use of a deprecated transformers property:
    neither tells the user anything, and either would print lines above a later one-line error."""
    hf_logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_tqdm_hook(None)


def load_base_model(model_name: str, device: torch.device, dtype: torch.dtype):
    """Load the causal LM, frozen; a missing or unreadable model directory is a one-line error."""
    try:
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - any loader failure is reported as one line naming the model
        raise UserError(f"cannot load --model_name {model_name!r}: {first_line(err)}") from None
    model.to(device)
    for param in model.parameters():
        param.requires_grad_(False)
    avoid_cudnn_attention(device)
    return model


def avoid_cudnn_attention(device: torch.device) -> None:
    """On CUDA, take cuDNN's fused attention out of torch's SDPA choices, for the whole process.

    It is torch's first choice on Hopper, and its backward returned NaN gradients for a left-padded bfloat16 batch whose
    answer attended to a cached prompt (H100, torch 2.11+cu130: `ScaledDotProductCudnnAttentionBackward0`; the main
    job's round 3 diverged with and without the prototype loss). The memory-efficient and math kernels gave finite,
    matching gradients on the same batch, and the memory-efficient one is what SDPA picks instead.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def grow_vocabulary(base, size: int) -> None:
    """Grow the embedding and LM head (tied or untied) to hold `size` token ids, never shrinking them (a backbone may
    carry more rows than its tokenizer has tokens); the backbone stays frozen.

    The new rows are left as the resize makes them, without transformers' mean resizing: a tool token's embedding and
    logit always come from its tool-memory rows, so these rows are never read, and skipping it spares a covariance over
    the embeddings and a draw from the global generator."""
    if size > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(size, mean_resizing=False)
    for param in base.parameters():
        param.requires_grad_(False)


def attach_lora(base, settings: LoraSettings):
    """Wrap a frozen causal LM with a peft LoRA adapter (float32 adapter weights); bad target modules are a UserError."""
    from peft import LoraConfig, get_peft_model

    layers = None
    if settings.layer_indices:
        num_layers = base.config.num_hidden_layers
        layers = []
        for index in settings.layer_indices:
            resolved = index + num_layers if index < 0 else index
            if not 0 <= resolved < num_layers:
                raise UserError(f"--lora_layer_indices: {index} is outside the model's {num_layers} layers")
            layers.append(resolved)
        layers = sorted(set(layers))
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with _quiet_loading():
            peft_model = get_peft_model(base, config)
    except ValueError as err:
        raise UserError(f"--lora_target_modules: {first_line(err).rstrip('.')}; the model's modules LoRA can adapt: "
                        f"{', '.join(lora_capable_modules(base))}") from None
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    return peft_model


def lora_capable_modules(model: nn.Module) -> list[str]:
    """The distinct last names of the model's layers that LoRA can adapt (linear, embedding, convolution)."""
    from transformers.pytorch_utils import Conv1D

    kinds = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, Conv1D)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, kinds)})


def trainable_lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters of `module` that currently require gradients."""
    return [p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


def set_lora_requires_grad(module: nn.Module, trainable: bool) -> None:
    """Switch training of every LoRA parameter of `module` on or off."""
    for name, param in module.named_parameters():
        if "lora_" in name:
            param.requires_grad_(trainable)


def backbone_and_lora_counts(module: nn.Module) -> tuple[int, int]:
    """(backbone parameters, LoRA parameters) of a possibly peft-wrapped model."""
    lora = sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
    backbone = sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n)
    return backbone, lora


class BackboneParts:
    """What the round loop asks of a model (mixed into an nn.Module) whose frozen `base_model` may carry a LoRA
    adapter: its tool-memory rows (none here; FunctionCallingModel has them), LoRA's parameters, whether they train,
    and the parameter counts."""

    def _start_backbone(self, model_name: str, tokenizer, device: str | torch.device | None,
                        dtype: str | torch.dtype | None) -> None:
        """Set the model's name, device, dtype and tokenizer (the given one, else the model's; padding with the
        end-of-sequence token when it has no pad token)."""
        self.model_name = str(model_name)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_name)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def causal_lm(self):
        """The underlying transformers causal LM (inside the peft wrapper when LoRA is on)."""
        base = self.base_model
        return base.get_base_model() if hasattr(base, "get_base_model") else base

    def row_parameters(self) -> list[nn.Parameter]:
        return []

    def lora_parameters(self) -> list[nn.Parameter]:
        return trainable_lora_parameters(self.base_model)

    def set_lora_trainable(self, trainable: bool) -> None:
        set_lora_requires_grad(self.base_model, trainable)

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameter counts: backbone (frozen), tool memory, LoRA, and the trainable total."""
        backbone, lora = backbone_and_lora_counts(self.base_model)
        memory = sum(p.numel() for p in self.row_parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"backbone": backbone, "tool_memory": memory, "lora": lora, "trainable": trainable}


def save_lora_adapter(peft_model, checkpoint: Path) -> None:
    """Write only the LoRA adapter (safetensors, atomically) and its peft config into `checkpoint/lora`."""
    from peft import get_peft_model_state_dict

    lora_dir = checkpoint / LORA_DIR
    # Never the embedding layers: peft would add them (tied ones twice, so safetensors refuses) whenever the
    # vocabulary was resized for new tool tokens, and the backbone's weights stay out of a checkpoint.
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    lora_state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    lora_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_with(lora_dir / "adapter_model.safetensors", lambda tmp: save_file(lora_state, tmp))
    config = peft_model.peft_config["default"].to_dict()
    config = {key: sorted(value, key=str) if isinstance(value, set) else value for key, value in config.items()}
    atomic_write_text(lora_dir / "adapter_config.json", json.dumps(config, indent=2, sort_keys=True))


def read_lora_adapter(peft_model, checkpoint: Path) -> dict[str, torch.Tensor]:
    """The adapter that `save_lora_adapter` wrote under `checkpoint/lora`, checked against `peft_model`'s adapter
    (the same tensor names and shapes); a damaged or foreign file is a UserError naming it."""
    from peft import get_peft_model_state_dict

    adapter = checkpoint / LORA_DIR / "adapter_model.safetensors"
    if not adapter.is_file():
        raise UserError(f"checkpoint {checkpoint} has no LoRA adapter but this model uses LoRA")
    state = read_safetensors(adapter, "checkpoint file")
    own = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    expected = {k: tuple(v.shape) for k, v in own.items()}
    check_tensor_shapes(adapter, state, expected, required=set(expected))
    return state


def apply_lora_adapter(peft_model, state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Load an adapter read by `read_lora_adapter` into `peft_model`."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in state.items()})


def load_lora_adapter(peft_model, checkpoint: Path, device: torch.device) -> None:
    """Load the adapter that `save_lora_adapter` wrote under `checkpoint/lora` into `peft_model`."""
    apply_lora_adapter(peft_model, read_lora_adapter(peft_model, checkpoint), device)


def check_tensor_shapes(path: Path, state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                        required: set[str]) -> None:
    """A checkpoint file's tensors are those this model expects (names and shapes): else a UserError naming it."""
    missing = sorted(required - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        what = f"lacks {missing[0]}" if missing else f"holds {unknown[0]}, unknown to this model"
        raise UserError(f"checkpoint file {path} {what}: it was not written by this run's model")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key]):
            raise UserError(f"checkpoint file {path}: {key} has shape {list(tensor.shape)}, this model's is "
                            f"{list(expected[key])}: it was not written by this run's model")


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of every prediction the loss scores: position p predicts label p + 1, so p is kept where that
    label is set. The labels are shifted, never the logits; the target of (r, p) is `labels[r, p + 1]`."""
    return (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)


class _HeadCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of float32 logits (one row per labelled position), after writing the tool columns
    into them in place; returns the per-row losses and the logits.

    The one vocabulary-sized tensor kept for backward is the log-probabilities, and backward turns it into the
    logits' gradient in place (softmax minus one-hot, scaled; the tool columns go to the tool logits' gradient).
    Autograd's composition of the same ops (index_copy_, log_softmax, nll_loss) would allocate three more in
    backward. The saved tensor is consumed, so the graph takes a single backward (a second one raises).
    """

    @staticmethod
    def forward(ctx, logits, targets, tool_ids, tool_logits):
        if tool_ids is not None:
            logits.index_copy_(1, tool_ids, tool_logits)
        ctx.mark_dirty(logits)
        ctx.set_materialize_grads(False)
        log_probs = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(log_probs, targets, tool_ids)
        return -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1), logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_logits):
        log_probs, targets, tool_ids = ctx.saved_tensors
        grad = log_probs.exp_()
        if grad_loss is None:
            grad.zero_()
        else:
            grad.mul_(grad_loss.unsqueeze(1))
            grad.scatter_add_(1, targets.unsqueeze(1), -grad_loss.unsqueeze(1))
        if grad_logits is not None:
            grad.add_(grad_logits)
        grad_tool = None
        if tool_ids is not None:
            grad_tool = grad.index_select(1, tool_ids)
            grad.index_fill_(1, tool_ids, 0.0)
        return grad, None, None, grad_tool


def labelled_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tool_targets: torch.Tensor,
    tool_ids: torch.Tensor | None = None,
    tool_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, loss, tool loss) from float32 head logits at the labelled positions, one row per target.

    `tool_logits` (rows x tools), when given, replace the `tool_ids` columns of `logits` in place first. The loss is
    the mean cross-entropy over every target, the tool loss the same over the targets `tool_targets` marks (zero,
    still in the graph, where none is).
    """
    if logits.dtype != torch.float32:
        raise ValueError(f"labelled_losses expects float32 logits, got {logits.dtype}")
    per_token, logits = _HeadCrossEntropy.apply(logits, targets, tool_ids, tool_logits)
    loss = per_token.mean() if per_token.numel() else per_token.sum() * 0.0
    tool_loss = per_token[tool_targets].mean() if tool_targets.any() else per_token.sum() * 0.0
    return logits, loss, tool_loss



class FunctionCallingModel(BackboneParts, nn.Module):
    """A frozen causal LM whose tool tokens are the trainable rows of a ToolMemory (`memory`), with optional LoRA."""

    def __init__(
        self,
        model_name: str,
        num_tools: int,
        tool_names: Sequence[str],
        tokenizer=None,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = None,
        decouple_embeddings: bool = False,
        lora_config: LoraSettings | None = None,
        memory_dtype: str = "float32",
    ):
        super().__init__()
        if num_tools != len(tool_names) or num_tools <= 0:
            raise UserError(f"num_tools ({num_tools}) must equal the number of tool names ({len(tool_names)}) and be > 0")
        if len(set(tool_names)) != len(tool_names):
            raise UserError("tool names must be unique")
        self._start_backbone(model_name, tokenizer, device, dtype)
        self.tool_names = list(tool_names)
        self.decouple_embeddings = decouple_embeddings
        self.lora_settings = lora_config

        token_ids, added = assign_tool_tokens(self.tokenizer, num_tools)
        base = load_base_model(self.model_name, self.device, self.dtype)
        if added:
            grow_vocabulary(base, len(self.tokenizer))
        self.base_model = attach_lora(base, lora_config) if lora_config else base
        self.end_id = end_of_turn_id(self.tokenizer)
        self.stop_ids = [self.end_id]

        self._name_to_index = {name: i for i, name in enumerate(self.tool_names)}
        vocab_size, hidden = self.causal_lm.get_input_embeddings().weight.shape
        # The rows are kept in float32 (the optimizer's precision) and cast to the backbone's dtype where used, unless
        # `memory_dtype` is `model`: the backbone's dtype, as the original keeps them (bf16 rows lose small updates).
        if memory_dtype not in MEMORY_DTYPES:
            raise UserError(f"--memory_dtype: expected one of {', '.join(MEMORY_DTYPES)}, got {memory_dtype!r}")
        self.memory_dtype = memory_dtype
        row_dtype = torch.float32 if memory_dtype == "float32" else self.dtype
        self.memory = ToolMemory(token_ids, vocab_size, hidden, self.device, row_dtype, decouple_embeddings)
        self.initialize_rows(seed=0)
        # Generation: tool tokens only at call boundaries (see CallBoundaryTracker), and only of the tools in
        # `generation_tools` (None: all); a sequential run offers only the tools learned so far.
        self.constrain_calls = True
        self.training_pass = resolve_training_pass("auto", self.device)  # training_hidden: split or one pass
        self.generation_tools: list[str] | None = None
        self._json_pieces: dict[int, str] | None = None
        self.eval()

    # --- structure -------------------------------------------------------------------------------------------------

    @property
    def num_tools(self) -> int:
        return len(self.tool_names)

    @property
    def tool_token_ids(self) -> torch.Tensor:
        """The tool tokens' ids, in tool order (the memory's)."""
        return self.memory.tool_token_ids

    @property
    def token_to_slot(self) -> torch.Tensor:
        """Token id -> tool index, -1 for a token that is no tool (the memory's)."""
        return self.memory.token_to_slot

    def get_tool_token_id(self, tool_name: str) -> int:
        """The token id that stands for a tool."""
        if tool_name not in self._name_to_index:
            raise KeyError(f"unknown tool {tool_name!r}")
        return int(self.tool_token_ids[self._name_to_index[tool_name]])

    def get_tool_name_from_token_id(self, token_id: int) -> str | None:
        """The tool a token id stands for, or None when it is no tool token."""
        if not 0 <= token_id < self.token_to_slot.shape[0]:
            return None
        slot = int(self.token_to_slot[token_id])
        return self.tool_names[slot] if slot >= 0 else None

    def encode_tool(self, tool_name: str) -> list[int]:
        """The answer ids for a tool: its one token (the `encode_tool` of dataset.build_answer_ids)."""
        return [self.get_tool_token_id(tool_name)]

    def set_generation_tools(self, tool_names: Sequence[str] | None) -> None:
        """Offer only these tools during generation (None: every tool of the memory)."""
        if tool_names is not None:
            unknown = [name for name in tool_names if name not in self._name_to_index]
            if unknown:
                raise UserError(f"unknown tool(s) for generation: {', '.join(unknown[:5])}")
            tool_names = list(tool_names)
        self.generation_tools = tool_names

    def blocked_tool_token_ids(self) -> torch.Tensor:
        """Token ids of the tools that generation must not emit (outside `generation_tools`)."""
        if self.generation_tools is None:
            return self.tool_token_ids[:0]
        offered = torch.zeros(self.num_tools, dtype=torch.bool, device=self.device)
        offered[[self._name_to_index[name] for name in self.generation_tools]] = True
        return self.tool_token_ids[~offered]

    def call_boundary_tracker(self, batch: int) -> CallBoundaryTracker:
        """A tracker of the call boundaries of `batch` answers; it masks tool tokens inside calls with
        `constrain_calls`."""
        if self._json_pieces is None:
            self._json_pieces = CallBoundaryTracker.json_pieces(self.tokenizer)
        return CallBoundaryTracker(self._json_pieces, self.tool_token_ids, batch, enforce=self.constrain_calls)

    def decoding_processors(self, batch: int, gold_tools: Sequence[Sequence[str]] | None = None,
                            style: str = "forced") -> list[ScoreProcessor]:
        """TokMem's decoding rules for `batch` answers: offered tools only, tools only at call boundaries, and with
        `gold_tools` the gold tools forced into the tool positions (see ToolForcingProcessor)."""
        tracker = self.call_boundary_tracker(batch)
        processors: list[ScoreProcessor] = [OfferedTools(self.blocked_tool_token_ids()), tracker]
        if gold_tools is not None:
            gold_ids = [[self.get_tool_token_id(t) for t in tools] for tools in gold_tools]
            processors.append(ToolForcingProcessor(gold_ids, self.tool_token_ids, self.end_id, tracker, style))
        return processors

    def set_stop_tokens(self, stop_tokens: str) -> None:
        """Where an answer ends: at end-of-turn (`eot`), or also at every end-of-sequence id of the model's generation
        config (`generation_config`, as Hugging Face `generate` stops: Llama-3's `<|end_of_text|>` too)."""
        if stop_tokens not in STOP_TOKENS:
            raise UserError(f"--stop_tokens: expected one of {', '.join(STOP_TOKENS)}, got {stop_tokens!r}")
        ids = [self.end_id]
        if stop_tokens == "generation_config":
            eos = self.causal_lm.generation_config.eos_token_id
            ids += [i for i in ([eos] if isinstance(eos, int) else eos or []) if i not in ids]
        self.stop_ids = ids

    def row_parameters(self) -> list[nn.Parameter]:
        """The memory's rows (input rows, and output rows when decoupled)."""
        return self.memory.rows()

    def initialize_rows(self, seed: int | None = 0, norm: str = "embedding", drawn_rows: int | None = None) -> None:
        """Re-initialise the memory's rows against the backbone's embeddings and LM head (ToolMemory.initialize;
        seed None: from the global generator, as the original)."""
        self.memory.initialize(self.causal_lm.get_input_embeddings().weight,
                               self.causal_lm.get_output_embeddings().weight, seed, norm, drawn_rows)

    # --- forward ---------------------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings where every tool token's vector is its input row (one lookup, no loop over tools)."""
        return self.memory.embed(input_ids, self.causal_lm.get_input_embeddings()(input_ids))

    def tool_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The memory's tool logits of `hidden` (ToolMemory.tool_logits)."""
        return self.memory.tool_logits(hidden)

    def tool_logits_into(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Overwrite the tool columns of float32 `logits` with the memory's logits of `hidden`; returns them."""
        return self.memory.tool_logits_into(hidden, logits)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values=None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        last_position_only: bool = False,
    ) -> CallingOutput:
        """Float32 logits over the vocabulary with the memory's tool columns, and the losses when `labels` are given.

        With labels (training), the LM head and the loss run only at the positions whose next label is set, and
        `logits` holds those rows alone (rows x vocabulary, batch-major, `labelled_positions`' order). Without
        labels, `logits` is batch x length x vocabulary, or batch x 1 x vocabulary with `last_position_only`.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = left_pad_positions(attention_mask)
        if labels is not None:
            if past_key_values is not None or use_cache or last_position_only:
                raise ValueError("a forward with labels takes no cache and scores every labelled position")
            return self.answer_losses(self.training_hidden(input_ids, attention_mask, position_ids), labels)
        decoder_out = self.causal_lm.get_decoder()(
            inputs_embeds=self.embed(input_ids),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        hidden = decoder_out.last_hidden_state
        if last_position_only:
            hidden = hidden[:, -1:]
        logits = self.tool_logits_into(hidden, self.causal_lm.get_output_embeddings()(hidden).float())
        return CallingOutput(logits=logits, past_key_values=decoder_out.past_key_values)

    def answer_losses(self, hidden: torch.Tensor, labels: torch.Tensor) -> CallingOutput:
        """The LM head, the tool logits and the losses at the labelled positions of last hidden states `hidden`:
        the loss over every labelled token, the tool loss over the tool-token targets."""
        rows, positions = labelled_positions(labels)
        picked = hidden[rows, positions]
        targets = labels[rows, positions + 1]
        head = self.causal_lm.get_output_embeddings()(picked).float()
        is_tool = self.memory.is_tool(targets)
        logits, loss, tool_loss = labelled_losses(head, targets, is_tool, self.tool_token_ids, self.tool_logits(picked))
        return CallingOutput(logits=logits, loss=loss, tool_loss=tool_loss, num_tool_targets=is_tool.sum())

    def training_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Last hidden states of a training batch.

        With no trainable backbone parameter (LoRA off or frozen), nothing before the batch's first tool token
        depends on a trained value: that prefix runs without autograd, and the rest attends to its cached keys and
        values, so backward neither stores nor walks the prompt's activations. With `training_pass` `one` the batch
        runs in one pass, as the original's does (`--rng original` forces it: a frozen adapter's dropout then draws
        its masks in the original's shapes and order).
        """
        decoder = self.causal_lm.get_decoder()
        split = self.constant_prefix_length(input_ids) if torch.is_grad_enabled() else 0
        if split == 0:
            return decoder(inputs_embeds=self.embed(input_ids), attention_mask=attention_mask,
                           position_ids=position_ids, use_cache=False).last_hidden_state
        with torch.no_grad():
            prefix = decoder(inputs_embeds=self.embed(input_ids[:, :split]), attention_mask=attention_mask[:, :split],
                             position_ids=position_ids[:, :split], use_cache=True)
        if split == input_ids.shape[1]:
            return prefix.last_hidden_state
        rest = decoder(inputs_embeds=self.embed(input_ids[:, split:]), attention_mask=attention_mask,
                       position_ids=position_ids[:, split:], past_key_values=prefix.past_key_values, use_cache=False)
        return torch.cat([prefix.last_hidden_state, rest.last_hidden_state], dim=1)

    def constant_prefix_length(self, input_ids: torch.Tensor) -> int:
        """How many leading positions hold no tool token in any row, when no backbone parameter is trained and
        `training_pass` is `split` (else 0)."""
        if self.training_pass != "split" or any(p.requires_grad for p in self.base_model.parameters()):
            return 0
        has_tool = self.memory.is_tool(input_ids).any(dim=0).nonzero()
        return int(has_tool[0]) if len(has_tool) else input_ids.shape[1]

    # --- generation ------------------------------------------------------------------------------------------------

    def decoding_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                      cache) -> tuple[torch.Tensor, object]:
        """One step for decoding.greedy_decode: the last position's scores (tool columns from the rows) and cache."""
        out = self.forward(input_ids, attention_mask, past_key_values=cache, position_ids=position_ids,
                           use_cache=True, last_position_only=True)
        return out.logits[:, -1, :], out.past_key_values

    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int = 256,
                     processors: Sequence[ScoreProcessor] | None = None) -> list[list[int]]:
        """Greedy decoding (decoding.greedy_decode) under `processors` (default: `decoding_processors`); each row's
        new ids up to end-of-turn."""
        if processors is None:
            processors = self.decoding_processors(input_ids.shape[0])
        return greedy_decode(self.decoding_step, input_ids.to(self.device), attention_mask.to(self.device),
                             max_new_tokens, self.stop_ids, processors)

    def parse_generated(self, token_ids: Sequence[int]) -> GeneratedCalls:
        """Split generated ids at tool tokens into tools and their argument strings (text before a tool is dropped)."""
        tools: list[str] = []
        calls: list[list[int]] = []
        answer: list[int] = []
        for token_id in token_ids:
            if token_id in self.stop_ids:
                break
            answer.append(token_id)
            name = self.get_tool_name_from_token_id(token_id)
            if name is not None:
                tools.append(name)
                calls.append([])
            elif calls:
                calls[-1].append(token_id)
        function_calls = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in calls]
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=False)
        untooled = None if tools else self.tokenizer.decode(answer, skip_special_tokens=True).strip()
        return GeneratedCalls(tools, function_calls, text, list(token_ids), untooled)

    def generate_with_tool_prediction(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int = 256
    ) -> list[GeneratedCalls]:
        """The model picks its own tools: batched greedy decoding, parsed into tools and calls."""
        return [self.parse_generated(ids) for ids in self.generate_ids(input_ids, attention_mask, max_new_tokens)]

    def generate_with_ground_truth_tools(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        gold_tools: Sequence[Sequence[str]],
        max_new_tokens: int = 256,
        style: str = "forced",
    ) -> list[GeneratedCalls]:
        """The gold tools take the tool positions (see ToolForcingProcessor); the model writes the arguments."""
        processors = self.decoding_processors(input_ids.shape[0], gold_tools, style)
        ids = self.generate_ids(input_ids, attention_mask, max_new_tokens, processors)
        return [self.parse_generated(row) for row in ids]

    # --- checkpoints -----------------------------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The rows as float32 tensors (the checkpoint's content beside the LoRA adapter)."""
        return self.memory.trainable_state()

    def save(self, directory: str | Path) -> None:
        """Write the rows (safetensors + JSON of names and token ids) and the LoRA adapter (peft); nothing else."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_with(directory / MEMORY_FILE, lambda tmp: save_file(self.trainable_state(), tmp))
        meta = {
            "model_name": self.model_name,
            "tool_names": self.tool_names,
            "tool_token_ids": self.tool_token_ids.tolist(),
            "decouple_embeddings": self.decouple_embeddings,
            "memory_dtype": self.memory_dtype,
            "lora": asdict(self.lora_settings) if self.lora_settings else None,
            "generation_tools": self.generation_tools,
        }
        if self.lora_settings:
            save_lora_adapter(self.base_model, directory)
        atomic_write_json(directory / MEMORY_META_FILE, meta)

    def load(self, directory: str | Path) -> None:
        """Load a checkpoint written by `save` into this model (same tools, same shapes)."""
        directory = Path(directory)
        meta_path, memory_path = directory / MEMORY_META_FILE, directory / MEMORY_FILE
        if not meta_path.is_file() or not memory_path.is_file():
            raise UserError(f"checkpoint {directory} is incomplete: expected {MEMORY_FILE} and {MEMORY_META_FILE}")
        meta = read_json(meta_path, "checkpoint file")
        if not isinstance(meta, dict) or not isinstance(meta.get("tool_names"), list) \
                or not isinstance(meta.get("decouple_embeddings"), bool) \
                or not isinstance(meta.get("generation_tools", []), (list, type(None))):
            raise UserError(f"checkpoint file {meta_path}: expected an object with tool_names (a list), "
                            "decouple_embeddings (true or false) and generation_tools")
        if meta["tool_names"] != self.tool_names:
            raise UserError(f"checkpoint {directory} holds different tools than this model")
        if meta.get("tool_token_ids", self.tool_token_ids.tolist()) != self.tool_token_ids.tolist():
            raise UserError(f"checkpoint {directory} maps its tools to other token ids than this model's tokenizer does "
                            "(a different tokenizer or --model_name)")
        if meta["decouple_embeddings"] != self.decouple_embeddings:
            raise UserError(f"checkpoint {directory} differs in --decouple_embeddings")
        unknown = sorted(set(meta.get("generation_tools") or []) - set(self.tool_names))
        if unknown:
            raise UserError(f"checkpoint file {meta_path}: generation_tools names unknown tools: {unknown[:3]}")
        state = read_safetensors(memory_path, "checkpoint file")
        check_tensor_shapes(memory_path, state, self.memory.expected_shapes(), required=self.memory.required_keys())
        if self.lora_settings:
            adapter = read_lora_adapter(self.base_model, directory)
        self.set_generation_tools(meta.get("generation_tools"))
        self.memory.load_trainable_state(state)
        if self.lora_settings:
            apply_lora_adapter(self.base_model, adapter, self.device)
