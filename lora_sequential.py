"""The LoRA baseline, round after round: a frozen LM plus a LoRA adapter learns each round's tools as text markers.

    python lora_sequential.py --training_rounds 1-20:3,21-40:3,41-60:3 --eval_all_previous [--use_replay_buffer]

The answer names each tool with a plain-text marker (`[tool_7]`, or `[tool: get_weather]` with --marker_style name)
followed by the arguments JSON. A marker stands for the same tool in every round: the numbering is the tool's place in
the run's global tool list (all rounds' training tools), fixed before the first round. Generated text is split at the
markers and mapped back to tool names, so the scores are TokMem's. Options: re-initialise the adapter each round, and
replay earlier rounds' samples in every training batch (`--replay_policy`: this toolkit's reservoir or the original's
rule).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

import distributed
from common import CliParser, UserError, atomic_write_json, positive_int, read_json, unit_interval
from dataset import NativeFunctionCallingDataset, end_of_turn_id, make_dataloader
from decoding import causal_lm_step, greedy_decode, left_pad_positions
from experiment import RoundData, print_final_report
from model import (BackboneParts, CallingOutput, GeneratedCalls, LoraSettings, attach_lora, labelled_losses,
                   labelled_positions, load_base_model, load_lora_adapter, save_lora_adapter)
from replay_buffer import (REPLAY_POLICIES, DisplacingBatchSampler, ReplaySettings, ReservoirBuffer,
                           check_replay_settings, mixed_dataloader, original_round_subset, sampled_dataloader)
from sequential import preflight, prepare_run, run_rounds, start_run
from settings import RunSettings, add_sequential_flags, lora_settings, run_settings, train_settings
from training import TrainSettings

logger = logging.getLogger("lora_sequential")

MARKERS_FILE = "markers.json"


class ToolMarkers:
    """Plain-text tool markers over a fixed, global tool list; `split` maps generated text back to tools."""

    STYLES = ("number", "name")

    def __init__(self, tool_names: Sequence[str], style: str = "number"):
        if style not in self.STYLES:
            raise UserError(f"--marker_style: expected one of {', '.join(self.STYLES)}, got {style!r}")
        if len(set(tool_names)) != len(tool_names) or not tool_names:
            raise UserError("the marker baseline needs a non-empty list of unique tool names")
        self.tool_names = list(tool_names)
        self.style = style
        self._number = {name: index + 1 for index, name in enumerate(self.tool_names)}
        self.pattern = re.compile(r"\[tool_(\d+)\]" if style == "number" else r"\[tool: ?([^\[\]\n]+?)\]")

    def marker(self, tool: str) -> str:
        """The marker of a tool: `[tool_N]` (N = 1-based place in the global list) or `[tool: name]`."""
        if tool not in self._number:
            raise KeyError(f"unknown tool {tool!r}")
        return f"[tool_{self._number[tool]}]" if self.style == "number" else f"[tool: {tool}]"

    def tool_of(self, match: re.Match) -> str:
        """The tool a marker match stands for; an unknown marker stays as its own text (it matches no gold tool)."""
        if self.style == "name":
            return match.group(1).strip()
        number = int(match.group(1))
        return self.tool_names[number - 1] if 1 <= number <= len(self.tool_names) else match.group(0)

    def split(self, text: str) -> tuple[list[str], list[str]]:
        """(tools, call strings): the text after each marker up to the next one is its call; text before is dropped."""
        matches = list(self.pattern.finditer(text))
        tools = [self.tool_of(match) for match in matches]
        ends = [m.start() for m in matches[1:]] + [len(text)]
        calls = [text[match.end():end].strip() for match, end in zip(matches, ends)]
        return tools, calls

    def as_dict(self) -> dict[str, str]:
        return {name: self.marker(name) for name in self.tool_names}


class MarkerLoRAModel(BackboneParts, nn.Module):
    """A frozen causal LM with a LoRA adapter; tools are text markers (the duck-typed model of training.py)."""

    def __init__(
        self,
        model_name: str,
        tool_names: Sequence[str],
        lora_config: LoraSettings,
        tokenizer=None,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = None,
        marker_style: str = "number",
    ):
        super().__init__()
        self._start_backbone(model_name, tokenizer, device, dtype)
        self.markers = ToolMarkers(tool_names, marker_style)
        self.lora_settings = lora_config
        self.base_model = attach_lora(load_base_model(self.model_name, self.device, self.dtype), lora_config)
        self.end_id = end_of_turn_id(self.tokenizer)
        self._marker_ids = {
            name: self.tokenizer(marker, add_special_tokens=False)["input_ids"]
            for name, marker in self.markers.as_dict().items()
        }
        self._marker_spans = {tuple(ids) for ids in self._marker_ids.values()}
        self._marker_lengths = sorted({len(ids) for ids in self._marker_ids.values()})
        self._marker_starts = {ids[0] for ids in self._marker_ids.values()}
        self.eval()

    @property
    def tool_names(self) -> list[str]:
        return self.markers.tool_names

    @property
    def num_tools(self) -> int:
        return len(self.markers.tool_names)

    def encode_tool(self, tool_name: str) -> list[int]:
        """The answer ids for a tool: its marker's tokens (the `encode_tool` of dataset.build_answer_ids)."""
        if tool_name not in self._marker_ids:
            raise KeyError(f"unknown tool {tool_name!r}")
        return list(self._marker_ids[tool_name])

    @torch.no_grad()
    def reinit_lora(self, seed: int) -> None:
        """Re-initialise the adapter as peft does (A random, B zero), seeded, without touching the global RNG."""
        from peft.tuners.lora import LoraLayer

        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for module in self.base_model.modules():
                if isinstance(module, LoraLayer):
                    module.reset_lora_parameters("default", True)

    # --- forward ---------------------------------------------------------------------------------------------------

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> CallingOutput:
        """Logits and, with `labels`, the losses (the tool loss over the marker tokens).

        With labels the LM head runs only at the positions whose next label is set and `logits` holds those rows
        (rows x vocabulary, float32); without, it is the full batch x length x vocabulary.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = left_pad_positions(attention_mask)
        if labels is None:
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False)
            return CallingOutput(logits=out.logits)
        causal_lm = self.base_model.get_base_model()
        hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids, use_cache=False).last_hidden_state
        rows, positions = labelled_positions(labels)
        logits = causal_lm.get_output_embeddings()(hidden[rows, positions]).float()
        is_marker = self.marker_positions(labels)[rows, positions + 1]
        logits, loss, tool_loss = labelled_losses(logits, labels[rows, positions + 1], is_marker)
        return CallingOutput(logits=logits, loss=loss, tool_loss=tool_loss, num_tool_targets=is_marker.sum())

    def marker_positions(self, labels: torch.Tensor) -> torch.Tensor:
        """Bool mask shaped like `labels`: True on the tokens of every marker in the labelled answer."""
        mask = torch.zeros(labels.shape, dtype=torch.bool)
        for row, ids in enumerate(labels.tolist()):
            for start, token in enumerate(ids):
                if token not in self._marker_starts:
                    continue
                for length in self._marker_lengths:
                    if tuple(ids[start:start + length]) in self._marker_spans:
                        mask[row, start:start + length] = True
        return mask.to(labels.device)

    # --- generation ------------------------------------------------------------------------------------------------

    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     max_new_tokens: int = 256) -> list[list[int]]:
        """Greedy decoding (decoding.greedy_decode, adapter on, no processors); each row's new ids up to end-of-turn."""
        return greedy_decode(causal_lm_step(self.base_model.get_base_model()), input_ids.to(self.device),
                             attention_mask.to(self.device), max_new_tokens, [self.end_id])

    def set_generation_tools(self, tool_names: Sequence[str] | None) -> None:
        """Part of the shared round loop's interface; markers are plain text, so no marker is ever blocked."""

    def parse_generated(self, token_ids: Sequence[int]) -> GeneratedCalls:
        """Split the decoded answer at its markers into tools and their call strings."""
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        tools, calls = self.markers.split(text)
        return GeneratedCalls(tools, calls, text, list(token_ids))

    def generate_with_tool_prediction(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int = 256
    ) -> list[GeneratedCalls]:
        """The model writes markers and arguments itself; each answer parsed into tools and calls."""
        return [self.parse_generated(ids) for ids in self.generate_ids(input_ids, attention_mask, max_new_tokens)]

    # --- checkpoints -----------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write the LoRA adapter (safetensors via peft) and the marker table; never backbone weights."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_lora_adapter(self.base_model, directory)
        atomic_write_json(directory / MARKERS_FILE, {
            "model_name": self.model_name,
            "marker_style": self.markers.style,
            "tool_names": self.tool_names,
            "markers": self.markers.as_dict(),
            "lora": asdict(self.lora_settings),
        })

    def load(self, directory: str | Path) -> None:
        """Load a checkpoint written by `save` (same tools, same marker style)."""
        directory = Path(directory)
        meta_path = directory / MARKERS_FILE
        if not meta_path.is_file():
            raise UserError(f"checkpoint {directory} is incomplete: expected {MARKERS_FILE}")
        meta = read_json(meta_path, "checkpoint file")
        if not isinstance(meta, dict) or not isinstance(meta.get("tool_names"), list) \
                or not isinstance(meta.get("marker_style"), str):
            raise UserError(f"checkpoint file {meta_path}: expected an object with tool_names (a list) and "
                            "marker_style")
        if meta["tool_names"] != self.tool_names or meta["marker_style"] != self.markers.style:
            raise UserError(f"checkpoint {directory} holds different tools or markers than this model")
        load_lora_adapter(self.base_model, directory, self.device)


@dataclass(frozen=True)
class BaselineSettings:
    """The LoRA baseline's own settings: marker style, a fresh adapter per round, and replay (None: off)."""

    marker_style: str = "number"
    reinit_lora_after_each_round: bool = False
    replay: ReplaySettings | None = None


class BaselineRounds:
    """The hooks run_rounds calls: adapter re-initialisation per round and the replay-mixed training loader.

    The buffer is refilled from the finished rounds' training files before each round, in round order, so it is a
    deterministic function of the data and the seed: a resumed run rebuilds exactly the buffer it had. What a round
    offers the buffer and how batches are mixed follow `--replay_policy` (see replay_buffer).
    """

    def __init__(self, settings: RunSettings, baseline: BaselineSettings, model: MarkerLoRAModel,
                 data: Sequence[RoundData]):
        self.settings = settings
        self.reinit_each_round = baseline.reinit_lora_after_each_round
        self.replay = baseline.replay
        self.model = model
        self.data = data
        self.buffer = None
        self.replay_per_batch = 0
        if self.replay is not None:
            self.buffer = ReservoirBuffer(self.replay.buffer_size, settings.seed)
            self.replay_per_batch = check_replay_settings(settings.train.batch_size, self.replay.ratio,
                                                          self.replay.policy)
        self._rounds_in_buffer = 0

    def prepare_round(self, index: int) -> list[dict]:
        if self.reinit_each_round and index > 0:
            self.model.reinit_lora(self.settings.seed + index)
            logger.info("round %d: LoRA adapter re-initialised", index + 1)
        return self.data[index].train

    def offered(self, round_index: int) -> list[dict]:
        """What a finished round offers the buffer: all its training samples, or the original policy's subset."""
        samples = self.data[round_index].train
        if self.replay.policy == "original":
            return original_round_subset(samples, f"replay-{self.settings.seed}-{round_index}")
        return samples

    def fill_buffer(self, index: int) -> None:
        """Offer the buffer what every earlier round it has not seen yet offers."""
        for earlier in range(self._rounds_in_buffer, index):
            self.buffer.add_many(self.offered(earlier))
        self._rounds_in_buffer = max(self._rounds_in_buffer, index)

    def make_loader(self, index: int, train_set: NativeFunctionCallingDataset, shuffle: bool, seed: int):
        pad_id = self.model.tokenizer.pad_token_id
        batch_size = self.settings.train.batch_size
        if self.buffer is not None and index > 0 and self.replay_per_batch == 0:
            logger.warning("round %d: --replay_ratio %s at --batch_size %d replays no sample (%s policy)",
                           index + 1, self.replay.ratio, batch_size, self.replay.policy)
        if self.buffer is None or index == 0 or self.replay_per_batch == 0:
            return make_dataloader(train_set, batch_size, pad_id, shuffle, seed)
        self.fill_buffer(index)
        data = self.settings.data
        replay_set = NativeFunctionCallingDataset(self.buffer.items, self.model.tokenizer, self.model.encode_tool,
                                                  data.max_length, "train", prompt_format=data.prompt_format)
        logger.info("round %d: %d replay samples per batch of %d (%s policy), from a buffer of %d (of %d offered)",
                    index + 1, self.replay_per_batch, batch_size, self.replay.policy, len(self.buffer),
                    self.buffer.seen)
        if self.replay.policy == "original":
            sampler = DisplacingBatchSampler(len(train_set), len(replay_set), batch_size, self.replay.ratio, shuffle,
                                             seed)
            return sampled_dataloader(train_set, replay_set, sampler, pad_id)
        return mixed_dataloader(train_set, replay_set, batch_size, self.replay_per_batch, pad_id, shuffle, seed)


def build_parser() -> CliParser:
    parser = CliParser(description=__doc__.splitlines()[0])
    add_sequential_flags(parser)
    parser.set_defaults(lr=TrainSettings.lora_lr)
    parser.add_argument("--marker_style", choices=ToolMarkers.STYLES, default=BaselineSettings.marker_style,
                        help="number: [tool_7] (global numbering); name: [tool: get_weather]")
    parser.add_argument("--reinit_lora_after_each_round", action="store_true",
                        help="start every round after the first from a fresh (seeded) adapter")
    parser.add_argument("--use_replay_buffer", action="store_true", help="replay earlier rounds' samples")
    parser.add_argument("--replay_buffer_size", type=positive_int, default=ReplaySettings.buffer_size,
                        help="reservoir capacity")
    parser.add_argument("--replay_ratio", type=unit_interval, default=ReplaySettings.ratio,
                        help="share of every training batch drawn from the buffer (rounds after the first)")
    parser.add_argument("--replay_policy", choices=REPLAY_POLICIES, default=ReplaySettings.policy,
                        help="reservoir: every earlier sample offered to the buffer, round(batch x ratio) replayed per "
                             "batch beside the new ones; original: a random min(n/2, 500) of each finished round "
                             "offered, int(batch x ratio) new samples per batch replaced by replayed ones "
                             "(default: reservoir)")
    return parser


def settings_from(args) -> tuple[RunSettings, BaselineSettings]:
    """The parsed flags as the run's settings and the baseline's; --lr is the adapter's rate."""
    replay = None
    if args.use_replay_buffer:
        replay = ReplaySettings(args.replay_buffer_size, args.replay_ratio, args.replay_policy)
        check_replay_settings(args.batch_size, replay.ratio, replay.policy)
    baseline = BaselineSettings(args.marker_style, args.reinit_lora_after_each_round, replay)
    return run_settings(args, train_settings(args, lora_lr=args.lr), lora_settings(args)), baseline


def main(argv: Sequence[str] | None = None) -> int:
    settings, baseline = settings_from(build_parser().parse_args(argv))
    method = "lora_replay" if baseline.replay is not None else "lora"
    if settings.output.preflight:
        preflight(settings)
        return 0
    plan = prepare_run(settings, method)
    with plan.lock:
        settings, data, tool_names = plan.settings, plan.data, plan.tool_names
        model = MarkerLoRAModel(plan.model_name, tool_names, settings.lora, device=settings.model.device,
                                dtype=settings.model.dtype, marker_style=baseline.marker_style)
        run = start_run(plan, model)
        hooks = BaselineRounds(settings, baseline, model, data)
        logger.info("run directory %s; %d tools over %d rounds, markers %s ... %s; parameters %s", run.path,
                    len(tool_names), len(data), model.markers.marker(tool_names[0]),
                    model.markers.marker(tool_names[-1]), model.parameter_breakdown())
        summary = run_rounds(settings, model, data, run, prepare_round=hooks.prepare_round,
                             train_lora_for=lambda index: True, make_loader=hooks.make_loader)
    if run.writer:
        print_final_report(run, summary)
    return 0


if __name__ == "__main__":
    distributed.run_cli(main)
